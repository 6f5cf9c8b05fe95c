"""Sources: one reader per format, each registered under its ``--dataset`` name (``register_source``).

* ``named.py``: the fixed-format sets ``digits``, ``cifar10``, ``cifar100`` and ``svhn``; ``fashion_mnist.py``;
* ``folder.py``: ``folder``, an ImageFolder directory or tar, decoded once into ``cache.py``'s cache (``imagetree.py``
  decodes it), or streamed from its files (``streamed.py``) when it is too large for that;
* ``shards.py``: ``shards``, WebDataset-style tar shards, always streamed (``shard_writer.py`` writes them);
* ``locking.py``: ``build_lock``, one process builds a cache entry while the others wait.

Importing this package registers them, in this order (the order ``DATASETS`` lists them in).
"""

# The readers register themselves when imported, in the order DATASETS (and the refusal of an unknown name) lists them.
from metapl.data.sources import named  # noqa: F401

# isort: split
from metapl.data.sources import fashion_mnist, folder, shards  # noqa: F401
from metapl.data.sources.cache import default_cache_dir
from metapl.data.sources.load import load_dataset
from metapl.data.sources.locking import build_lock
from metapl.data.sources.readers import DatasetStats, ReadOptions, list_sources, register_source
from metapl.data.sources.shard_writer import write_shards
from metapl.data.sources.shards import ShardImages, rank_unlabeled_items
from metapl.data.sources.streamed import STREAM_ABOVE_BYTES, FolderImages, choose_data_path

DATASETS = tuple(list_sources())

__all__ = [
    "DATASETS",
    "STREAM_ABOVE_BYTES",
    "DatasetStats",
    "FolderImages",
    "ReadOptions",
    "ShardImages",
    "build_lock",
    "choose_data_path",
    "default_cache_dir",
    "list_sources",
    "load_dataset",
    "rank_unlabeled_items",
    "register_source",
    "write_shards",
]
