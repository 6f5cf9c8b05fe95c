"""The large teacher of the reduced methods (``reduced_mpl``, ``distill``; the paper's Appendix E): its predictions,
made once, and the reduced teacher's accuracy over them.

The large teacher (``--teacher`` started from ``--teacher-weights`` or ``--pretrained``) classifies every training
image (labeled, unlabeled and extra) and every test image once, on the eval view (the clean image: resized and
normalised as for evaluation, no augmentation), and is then dropped: it is never in memory while the student trains.
Its log-probabilities, K floats per image, are stored under the decode-once cache (``predictions/<key>.npz``), keyed
by the data's fingerprint, the teacher's name and a digest of its weights, the image size and the normalisation, and
reused by every run with the same key; a damaged or mismatched file is rebuilt. The reduced teacher
(``metapl.models.reduced.ReducedTeacher``) reads these rows in place of the images (``metapl.core.Batch.t_x_*``).

Why the clean view: the paper's large teacher labels each unlabeled image once; a prediction per augmented view would
need the large teacher in every step, which is what the reduced variant avoids. The student still learns on its
augmented (strong) view, as in full MPL. The weak and strong teacher inputs are therefore the same row, so UDA does not
apply to the reduced teacher (``metapl.methods.reduced_mpl`` refuses ``--uda-weight``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from metapl import data as mdata
from metapl.errors import reporting_os_errors

if TYPE_CHECKING:
    from metapl.config.fields import TrainConfig
    from metapl.data import SourceData, Split
    from metapl.training.setup import ModelStart

logger = logging.getLogger(__name__)


@dataclass
class TeacherPredictions:
    """The large teacher's log-probabilities, float32 rows aligned with the data's arrays."""

    train: np.ndarray  # (N_train, K)
    extra: np.ndarray | None  # (N_extra, K) for --unlabeled-dir images, else None
    test: np.ndarray  # (N_test, K)

    def test_accuracy(self, labels: np.ndarray) -> float:
        """The large teacher's own top-1 accuracy (%) on the test images."""
        hits = int(np.sum(self.test.argmax(axis=1) == np.asarray(labels)))
        return 100.0 * hits / max(len(labels), 1)  # counted as training.evaluation counts


def large_teacher_predictions(start: ModelStart) -> TeacherPredictions:
    """The stored predictions of the run's large teacher: read from the cache, or made now (by rank 0) and stored.

    Args:
        start: the run's ``metapl.training.setup.ModelStart``: its config (``teacher``, its weights, ``cache_dir``,
            ``eval_batch_size``, ``workers``), data, device (where the large teacher predicts), place in the job
            (rank 0 makes the file, the others wait and read it).
    """
    cfg, data, device, d = start.cfg, start.data, start.device, start.dist
    # Loaded on resume too: its weights' digest names the stored predictions.
    teacher = start.model("teacher", replace_head=False, load=True)
    key = {
        "fingerprint": mdata.data_fingerprint(data),
        "teacher": cfg.teacher,
        "weights": weights_digest(teacher),
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = (Path(cfg.cache_dir) if cfg.cache_dir else mdata.default_cache_dir()) / "predictions" / f"{digest}.npz"
    if d.is_main:
        # One process predicts, runs sharing the cache wait and read its file (metapl.data.build_lock).
        with mdata.build_lock(path):
            preds = _read(path, data)
            if preds is None:
                logger.info(
                    f"large teacher {cfg.teacher}: predicting {len(data.train)} training and {len(data.test)} test "
                    f"images once -> {path}"
                )
                _remove_torn(path)
                preds = _predict(teacher.to(device), data, device, cfg)
                _write(path, preds)
    del teacher
    if d.enabled:
        dist.barrier()
    if not d.is_main:
        preds = _read(path, data)
    assert preds is not None, f"{path} was not written"  # rank 0 wrote it before the barrier
    logger.info(
        f"large teacher {cfg.teacher}: {preds.test_accuracy(data.test.labels):.2f}% test accuracy (stored predictions)"
    )
    return preds


@torch.no_grad()
def _predict(teacher: nn.Module, data: SourceData, device: torch.device, cfg: TrainConfig) -> TeacherPredictions:
    teacher.eval()
    sets = {"train": data.train, "test": data.test}
    if data.extra_unlabeled is not None:
        sets["extra"] = data.extra_unlabeled
    out: dict[str, Any] = {"extra": None}
    for name, images in sets.items():
        loader = mdata.make_eval_loader(
            images,
            mean=data.mean,
            std=data.std,
            batch_size=cfg.eval_batch_size,
            num_workers=mdata.eval_workers(images, cfg.workers or 0),
        )
        rows = [torch.log_softmax(teacher(x.to(device)).float(), dim=1).cpu() for x, _ in loader]
        out[name] = torch.cat(rows).numpy() if rows else np.zeros((0, data.num_classes), np.float32)
    return TeacherPredictions(**out)


def _read(path: Path, data: SourceData) -> TeacherPredictions | None:
    """The stored predictions, or None when absent, unreadable or not of this data's shape (then rebuilt)."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None
    extra = data.extra_unlabeled
    want = {"train": len(data.train), "test": len(data.test), **({"extra": len(extra)} if extra is not None else {})}
    for name, rows in want.items():
        a = arrays.get(name)
        if a is None or a.shape != (rows, data.num_classes) or not np.isfinite(a).all():
            return None
    return TeacherPredictions(train=arrays["train"], extra=arrays.get("extra"), test=arrays["test"])


def _remove_torn(path: Path) -> None:
    """Delete what killed writes of ``path`` left (``_write``'s temporary files): under the build lock no other
    process is writing them."""
    for tmp in path.parent.glob(f".{path.stem}.tmp-*.npz"):
        tmp.unlink(missing_ok=True)


def _write(path: Path, preds: TeacherPredictions) -> None:
    """Write atomically: a killed run leaves the old file or none, never a torn one."""
    arrays: dict[str, Any] = {
        "train": preds.train,
        "test": preds.test,
        **({"extra": preds.extra} if preds.extra is not None else {}),
    }
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    with reporting_os_errors(path, "write the teacher's predictions to", "pass --cache-dir DIR"):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


@torch.no_grad()
def reduced_teacher_accuracy(
    teacher: nn.Module,
    preds: TeacherPredictions,
    data: SourceData,
    split: Split,
    device: torch.device,
    limit: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) of the reduced teacher over the large teacher's stored predictions: on the test images
    (``teacher_acc``) and, with a validation split, on it (``val_teacher_acc``); the first ``limit`` of each."""
    sets = {"": (preds.test, data.test.labels)}
    if len(split.val):
        sets["val_"] = (preds.train[split.val], np.asarray(data.train.labels)[split.val])
    was_training = teacher.training
    teacher.eval()
    out = {}
    for prefix, (x, y) in sets.items():
        # Copies: the labels are often a read-only memmap of the cache, which torch would only read with a warning.
        x_t, y_t = torch.from_numpy(np.array(x[:limit], dtype=np.float32)), torch.from_numpy(np.array(y[:limit]))
        hits = int((teacher(x_t.to(device)).argmax(dim=1).cpu() == y_t).sum())
        out[f"{prefix}teacher_acc"] = 100.0 * hits / max(len(y_t), 1)  # as training.evaluation counts
    teacher.train(was_training)
    return out


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes, dtypes and values): what identifies its predictions."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
