"""Views: one ``ViewSpec`` per view (weak, strong), run by two backends with the same pixel arithmetic.

* ``spec.py``: ``ViewSpec``, ``weak_view``, ``strong_view`` and ``train_crop``, what both backends share;
* ``per_image.py``: ``per_image(spec)``, one image at a time in the loader workers (and ``eval_transform``);
* ``per_batch.py``: ``BatchView(spec)``, whole uint8 batches on the training device, on ``kernels.py``'s pixel kernels.
"""

from metapl.data.views.per_batch import BatchView
from metapl.data.views.per_image import Cutout, eval_transform, per_image
from metapl.data.views.spec import ViewSpec, strong_view, train_crop, weak_view

__all__ = ["BatchView", "Cutout", "ViewSpec", "eval_transform", "per_image", "strong_view", "train_crop", "weak_view"]
