"""The training methods, one module each, registered by ``--method`` name (``metapl.methods.by_name``).

``meta_pseudo_labels`` (``--method mpl``), ``labels_only`` (``supervised``, the baseline), ``reduced_mpl`` (Reduced MPL
over a large teacher's stored predictions, ``large_teacher``), ``distill`` (its fixed-teacher control) and
``fixmatch_baseline`` (``fixmatch``, a one-network baseline). Importing the package registers them, in this order
(``--method``'s choices), without importing torch.
"""

import importlib

for _module in ("meta_pseudo_labels", "labels_only", "reduced_mpl", "distill", "fixmatch_baseline"):
    importlib.import_module(f"{__name__}.{_module}")
