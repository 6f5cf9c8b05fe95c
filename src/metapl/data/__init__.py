"""Data: from a data set's name to the seeded, exactly resumable batches of a run, in one pipeline::

    name, --data-dir
        │  sources/   one reader per format, registered by name (register_source), decoded once into the cache
        ▼
    SourceData      train / test / extra images, each an ImageStore (stores.py): ImageArrays, FolderImages, ShardImages
        │  split.py   which train images are labeled (seeded, class-balanced, fingerprinted)
        ▼
    Split ──────┐
                │  views/     one ViewSpec per view (weak, strong), run per image or per batch
                ▼
    make_train_batches(data, split, BatchSpec)   batches.py, on sampling.py's streams and datasets.py's datasets
                │
                ▼
    endless (x_l, y_l) and (x_uw, x_us, y_u) batches; make_eval_loader for ordered (x, y) evaluation batches

Typical use::

    data = load_dataset("cifar10", "../shared/data/cifar10-jpeg.tar.gz")
    split = make_split(data.train.labels, 4000, data.num_classes, seed=0)
    kw = {"hflip": data.hflip, "mean": data.mean, "std": data.std}
    weak, strong = weak_view(data.image_size, **kw), strong_view(data.image_size, **kw)
    spec = BatchSpec(batch_size=64, seed=0, weak=weak, strong=strong, mu=7)
    labeled, unlabeled = make_train_batches(data, split, spec)

(``BatchSpec(..., augment_on="device", device="cuda")`` makes the same views on whole batches on the GPU.)
"""

from metapl.data.batches import (
    BatchSpec,
    DeviceViews,
    close_batches,
    eval_workers,
    make_eval_loader,
    make_train_batches,
)
from metapl.data.datasets import EvalDataset, LabeledDataset, UnlabeledDataset
from metapl.data.sampling import ItemsSampler, ResumableSampler, mix_seed
from metapl.data.sources import (
    DATASETS,
    STREAM_ABOVE_BYTES,
    DatasetStats,
    FolderImages,
    ReadOptions,
    ShardImages,
    build_lock,
    choose_data_path,
    default_cache_dir,
    list_sources,
    load_dataset,
    rank_unlabeled_items,
    register_source,
    write_shards,
)
from metapl.data.split import (
    Split,
    check_fingerprint,
    data_fingerprint,
    load_split,
    make_split,
    per_class_counts,
    save_split,
)
from metapl.data.stores import ImageArrays, ImageStore, SourceData, StreamedImages
from metapl.data.views import (
    BatchView,
    Cutout,
    ViewSpec,
    eval_transform,
    per_image,
    strong_view,
    train_crop,
    weak_view,
)

__all__ = [
    "DATASETS",
    "STREAM_ABOVE_BYTES",
    "BatchSpec",
    "BatchView",
    "Cutout",
    "DatasetStats",
    "DeviceViews",
    "EvalDataset",
    "FolderImages",
    "ImageArrays",
    "ImageStore",
    "ItemsSampler",
    "LabeledDataset",
    "ReadOptions",
    "ResumableSampler",
    "ShardImages",
    "SourceData",
    "Split",
    "StreamedImages",
    "UnlabeledDataset",
    "ViewSpec",
    "build_lock",
    "check_fingerprint",
    "choose_data_path",
    "data_fingerprint",
    "default_cache_dir",
    "eval_transform",
    "eval_workers",
    "list_sources",
    "load_dataset",
    "load_split",
    "close_batches",
    "make_eval_loader",
    "make_split",
    "make_train_batches",
    "mix_seed",
    "per_class_counts",
    "per_image",
    "rank_unlabeled_items",
    "register_source",
    "save_split",
    "strong_view",
    "train_crop",
    "weak_view",
    "write_shards",
]
