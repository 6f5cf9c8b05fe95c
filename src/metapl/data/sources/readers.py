"""The one data-source registry: every reader registers under the ``--dataset`` name it reads.

A reader takes a ``ReadOptions`` and returns a ``SourceData``; ``load_dataset`` finds it by name. This module also
holds what several readers share: ``ReadOptions``, ``DatasetStats`` (the constants each named reader declares beside
itself) and ``cached_source``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from metapl.data.stores import ImageArrays, SourceData

DEFAULT_DATA_DIR = "data"  # torchvision downloads go here when --data-dir is not given


@dataclass(frozen=True)
class ReadOptions:
    """What ``load_dataset`` passes every reader (see its arguments); a reader uses the fields it needs."""

    data_dir: str | None
    download: bool
    image_size: int | None
    test_fraction: float
    cache_dir: str | None
    skip_corrupt: bool
    seed: int
    data_path: str | None = None  # auto, cache or stream (folders only; None: the reader's own default)
    stream_above: int | None = None  # decoded bytes above which auto streams; None: streamed.STREAM_ABOVE_BYTES


Reader = Callable[[ReadOptions], SourceData]


@dataclass(frozen=True)
class _Entry:
    reader: Reader
    streams: bool


_REGISTRY: dict[str, _Entry] = {}


def register_source(name: str, *, streams: bool = False) -> Callable[[Reader], Reader]:
    """Decorator that registers a reader under the data set name ``name``.

    Args:
        name: the ``--dataset`` name, lower case with dashes.
        streams: whether the reader can keep its images undecoded (``--data-path stream``).

    Returns:
        A decorator that stores the reader and returns it unchanged.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(fn: Reader) -> Reader:
        if name in _REGISTRY:
            raise ValueError(f"data source {name!r} is already registered (by {_REGISTRY[name].reader.__module__})")
        _REGISTRY[name] = _Entry(fn, streams)
        return fn

    return decorator


def list_sources() -> list[str]:
    """The registered data set names, in registration order (the order of ``sources/__init__.py``'s imports)."""
    return list(_REGISTRY)


def get_reader(name: str) -> Reader:
    """The reader registered under ``name`` (a KeyError for an unknown name)."""
    return _REGISTRY[name].reader


def can_stream(name: str) -> bool:
    """Whether the reader registered under ``name`` can stream its images."""
    return _REGISTRY[name].streams


class DatasetStats(NamedTuple):
    """A named data set's constants: per-channel mean and std in [0, 1] units, and whether a horizontal flip keeps the
    label (digits and house numbers are not mirror-symmetric). Folders compute their statistics from their own train
    images."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool


def cached_source(arrays: dict[str, np.ndarray], classes: list[str], stats: DatasetStats) -> SourceData:
    """A named data set's ``SourceData`` from its cached ``{train,test}_{images,labels}`` arrays."""
    return SourceData(
        train=ImageArrays(arrays["train_images"], arrays["train_labels"]),
        test=ImageArrays(arrays["test_images"], arrays["test_labels"]),
        extra_unlabeled=None,
        classes=classes,
        mean=stats.mean,
        std=stats.std,
        hflip=stats.hflip,
    )
