"""``load_dataset``: a data set by its registered name, read by its reader, with the extra unlabeled images."""

from __future__ import annotations

import logging

from metapl.data.sources.folder import read_unlabeled
from metapl.data.sources.readers import ReadOptions, can_stream, get_reader, list_sources
from metapl.data.stores import SourceData
from metapl.errors import UserError

logger = logging.getLogger(__name__)


def load_dataset(
    name: str,
    data_dir: str | None,
    *,
    download: bool = False,
    image_size: int | None = None,
    unlabeled_dir: str | None = None,
    test_fraction: float = 0.1,
    cache_dir: str | None = None,
    skip_corrupt: bool = False,
    seed: int = 0,
    data_path: str | None = None,
    stream_above: int | None = None,
) -> SourceData:
    """Read a dataset, decoding its images once into the cache (see ``sources.cache``) and memory-mapping them.

    Args:
        name: a registered data set name (``DATASETS``; ``register_source`` adds one).
        data_dir: where the data is, as its reader expects it: torchvision's root folder (default ``./data``; for CIFAR
            also an ImageFolder tree or a tar of one), a folder with the four Fashion-MNIST IDX files, an ImageFolder
            tree (``train/<class>/*`` + ``test/<class>/*``, or ``<class>/*``) or a tar of one, a folder (or glob) of
            ``.tar`` shards. ``digits`` reads none: giving one is an error rather than silently ignored.
        download: let torchvision download a missing ``cifar10``/``cifar100``/``svhn``/``fashion-mnist``.
        image_size: resize (shorter side, then centre crop) every image to this square size; needed when a folder's
            images differ in size.
        unlabeled_dir: optional folder or tar of extra images without classes, searched recursively.
        test_fraction: share of each class held out as test set when a folder has no ``test/`` subtree.
        cache_dir: cache root (default ``$METAPL_CACHE_DIR`` or ``~/.cache/metapl``).
        skip_corrupt: skip unreadable images with a warning instead of stopping.
        seed: seeds the train/test split of ``digits`` and of folders without ``test/``.
        data_path: ``cache`` (decode once into the cache), ``stream`` (keep file paths, decode in the loader workers;
            ``folder`` data sets; ``shards`` always stream) or ``auto`` (stream a folder whose decoded size exceeds
            ``stream_above``); None: ``stream`` for ``shards``, else ``cache``.
        stream_above: decoded bytes above which ``auto`` streams; None: ``streamed.STREAM_ABOVE_BYTES``.

    Returns:
        The ``SourceData``; on the streaming path its ``train`` and ``test`` are ``stores.StreamedImages``.
    """
    name = name.lower().replace("_", "-")
    _check_request(name, image_size, data_path)
    opts = ReadOptions(
        data_dir, download, image_size, test_fraction, cache_dir, skip_corrupt, seed, data_path, stream_above
    )
    data = get_reader(name)(opts)
    if unlabeled_dir is not None:
        data.extra_unlabeled = read_unlabeled(unlabeled_dir, data, opts)
    logger.info(_summary(name, data))
    return data


def _summary(name: str, data: SourceData) -> str:
    extra = f" + {len(data.extra_unlabeled)} extra unlabeled" if data.extra_unlabeled is not None else ""
    return (
        f"{name}: {len(data.train)} train / {len(data.test)} test images{extra}, "
        f"{data.image_size}x{data.image_size}x{data.in_channels}, {data.num_classes} classes"
    )


def _check_request(name: str, image_size: int | None, data_path: str | None) -> None:
    """Refuse an unknown name, a too small ``--image-size`` and streaming a source that cannot stream."""
    if name not in list_sources():
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(list_sources())}")
    if image_size is not None and image_size < 4:
        raise UserError(f"--image-size {image_size} is too small; use at least 4 pixels")
    if data_path == "stream" and not can_stream(name):
        raise UserError(
            f"--data-path stream reads image folders and tar shards only, not {name}; use --dataset folder or "
            "--data-path cache"
        )
