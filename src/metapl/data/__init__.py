"""Data: readers that decode each dataset once into a cache, the labeled split, augmentations and resumable loaders.

Typical use::

    data = load_dataset("cifar10", "../shared/data/cifar10-jpeg.tar.gz")
    split = make_split(data.train.labels, 4000, data.num_classes, seed=0)
    weak = weak_transform(data.image_size, hflip=data.hflip, mean=data.mean, std=data.std)
    strong = strong_transform(data.image_size, hflip=data.hflip, mean=data.mean, std=data.std)
    labeled, unlabeled = make_train_loaders(data, split, batch_size=64, mu=7, seed=0, weak=weak, strong=strong)

or, augmenting whole batches on the training device (``weak_batch_view``, ``strong_batch_view``,
``make_device_train_batches``).
"""

from metapl.data.arrays import ImageArrays, SourceData
from metapl.data.batch_augment import BatchView, strong_batch_view, weak_batch_view
from metapl.data.cache import default_cache_dir
from metapl.data.device_batches import make_device_train_batches
from metapl.data.loader import (
    EvalDataset,
    ItemsSampler,
    LabeledDataset,
    ResumableSampler,
    UnlabeledDataset,
    make_eval_loader,
    make_train_loaders,
)
from metapl.data.shards import ShardImages, rank_unlabeled_items, write_shards
from metapl.data.sources import DATASETS, load_dataset
from metapl.data.split import (
    Split,
    check_fingerprint,
    data_fingerprint,
    load_split,
    make_split,
    per_class_counts,
    save_split,
)
from metapl.data.stream import (
    STREAM_ABOVE_BYTES,
    FileImages,
    ImageFiles,
    choose_data_path,
    eval_workers,
    train_crop,
)
from metapl.data.transforms import Cutout, eval_transform, strong_transform, weak_transform

__all__ = [
    "DATASETS",
    "STREAM_ABOVE_BYTES",
    "BatchView",
    "Cutout",
    "EvalDataset",
    "FileImages",
    "ImageFiles",
    "ImageArrays",
    "ItemsSampler",
    "LabeledDataset",
    "ResumableSampler",
    "ShardImages",
    "SourceData",
    "Split",
    "UnlabeledDataset",
    "check_fingerprint",
    "choose_data_path",
    "data_fingerprint",
    "default_cache_dir",
    "eval_transform",
    "eval_workers",
    "load_dataset",
    "load_split",
    "make_device_train_batches",
    "make_eval_loader",
    "make_split",
    "make_train_loaders",
    "per_class_counts",
    "rank_unlabeled_items",
    "save_split",
    "strong_batch_view",
    "strong_transform",
    "train_crop",
    "weak_batch_view",
    "weak_transform",
    "write_shards",
]
