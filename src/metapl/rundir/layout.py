"""The run folder: the names of the files one run writes, and the reads and writes of its config, summary and split.

A run directory holds ``config.yaml`` (the resolved config), ``split.json`` (the labeled / unlabeled / validation
indices and the data fingerprint, ``metapl.data.split``), ``checkpoint.pt`` (latest), ``finetuned.pt``,
``metrics.jsonl``, ``tb/`` (TensorBoard), ``wandb/`` and ``wandb-id`` (Weights & Biases), ``train.log`` and
``summary.json`` (final accuracies); the commands add ``eval.json``, ``curves.png`` and ``export/``. The checkpoints'
contents belong to ``metapl.rundir.checkpoint``. The checks of a folder before a run writes into it (``check_out_dir``)
and ``--overwrite``'s deletion (``clear_run_files``) are here too.

Importing this module does not import torch: the command line names the run files in its ``--help``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from metapl.config.fields import TrainConfig, config_from_dict
from metapl.errors import UserError, few, reporting_os_errors

if TYPE_CHECKING:
    from metapl.data import Split

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"  # the resolved config (metapl.config.fields)
SPLIT = "split.json"  # labeled / unlabeled / validation indices and the data fingerprint (metapl.data.split)
METRICS = "metrics.jsonl"  # one JSON record per logged step (metapl.training.metrics)
SUMMARY = "summary.json"  # final accuracies
LATEST = "checkpoint.pt"  # the latest checkpoint: what --resume continues from
FINETUNED = "finetuned.pt"  # checkpoint.pt with the finetuned student (metapl.training.saver)
FINETUNE_PROGRESS = "finetune-progress.pt"  # a finetuning stopped by a signal, to continue (training.saver)
EVAL_JSON = "eval.json"  # metapl eval's result
CURVES = "curves.png"  # metapl plot's default image
TENSORBOARD = "tb"  # TensorBoard event files
WANDB = "wandb"  # Weights & Biases' folder (--wandb; offline runs stay there until `wandb sync`)
WANDB_ID = "wandb-id"  # the W&B run id of this run folder, so that --resume continues the same W&B run
EXPORT_DIR = "export"  # metapl export's default folder (metapl.rundir.export_format)
TRAIN_LOG = "train.log"  # the lines metapl train showed on the terminal (metapl.logs.RunLog)
# What one run writes into its directory (plus "<name>.eval.json" beside each checkpoint); --overwrite removes these.
RUN_FILES = (
    CONFIG,
    SPLIT,
    METRICS,
    SUMMARY,
    LATEST,
    FINETUNED,
    FINETUNE_PROGRESS,
    EVAL_JSON,
    CURVES,
    TENSORBOARD,
    WANDB,
    WANDB_ID,
    EXPORT_DIR,
    TRAIN_LOG,
    f"{Path(EVAL_JSON).stem}.confusion.png",  # metapl eval --plot
) + tuple(f"{Path(name).stem}.{EVAL_JSON}" for name in (LATEST, FINETUNED))

# The one-writer lock (metapl.rundir.lock). Not among RUN_FILES: --overwrite runs while its own process holds it, and a
# lock file is never deleted under a holder; a folder holding only a lock file counts as empty.
LOCK = ".lock"


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (``RUN_DIR/config.yaml``, or any file), in the order of ``--help``."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def save_run_config(cfg: TrainConfig, run_dir: str | Path) -> None:
    """Write ``RUN_DIR/config.yaml`` (a ``UserError`` naming it when the disk refuses)."""
    path = Path(run_dir) / CONFIG
    with reporting_os_errors(path):
        save_config(cfg, path)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config saved in a run directory (for ``--resume`` and the other commands).

    Raises:
        UserError: no such folder, no ``config.yaml`` in it, or one that is damaged.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the --out of an earlier metapl train")
    if not path.exists():
        raise UserError(f"{run_dir} has no {CONFIG}; pass a run directory written by metapl train")
    with reporting_os_errors(path, "read"):
        text = path.read_bytes()
    try:
        values = yaml.safe_load(text.decode("utf-8"))
        if not isinstance(values, dict):
            raise ValueError("not a mapping of option: value")
        return config_from_dict(values)
    except (yaml.YAMLError, ValueError, TypeError, UserError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path} is damaged ({reason}); repair it (checkpoint.pt keeps a copy of the run's config under 'config')"
        ) from None


def read_summary(run_dir: str | Path) -> dict:
    """The run's ``summary.json``, or ``{}`` when it has none yet."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return {}
    try:
        with reporting_os_errors(path, "read"):
            summary = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except UserError:  # a ValueError too: the read failed, named by reporting_os_errors
        raise
    except ValueError as e:
        raise UserError(f"{path} is damaged ({str(e)[:80]}); delete it (it is rewritten) and try again") from None
    return summary


def write_summary(run_dir: str | Path, summary: dict) -> None:
    """Write ``summary.json`` (a ``UserError`` naming it when the disk refuses)."""
    path = Path(run_dir) / SUMMARY
    with reporting_os_errors(path):
        path.write_text(json.dumps(summary, indent=2) + "\n")


def save_run_split(split: Split, run_dir: str | Path) -> None:
    """Write the run's ``split.json`` (``metapl.data.save_split``)."""
    from metapl.data import save_split  # the data package imports torch; this module stays light

    save_split(split, Path(run_dir) / SPLIT)


def load_run_split(run_dir: str | Path) -> Split:
    """The run's saved split (``metapl.data.load_split`` of ``split.json``)."""
    from metapl.data import load_split

    return load_split(Path(run_dir) / SPLIT)


# ----------------------------------------------------------------------------------------------------------------
# Before a run writes into its folder


def check_out_dir(out: str, *, resume: bool, overwrite: bool) -> Path:
    """Refuse a run directory that would mix two runs or overwrite files; nothing is written or deleted here.

    Args:
        out: ``--out`` (or the ``--resume`` directory).
        resume: the run in ``out`` is being continued: it must hold a checkpoint.
        overwrite: ``--overwrite``: a folder that is not empty is accepted (its run files are removed later by
            ``clear_run_files``, once the new run has been built).

    Returns:
        The run directory.
    """
    run_dir = check_out_path(out)
    if resume:
        if not (run_dir / LATEST).is_file():
            raise UserError(
                f"{run_dir} has no {LATEST} to resume from (stopped before its first save?); start it again with "
                f"metapl train --out {run_dir} --overwrite and the same options"
            )
        return run_dir
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
    if not entries or overwrite:
        return run_dir
    if LATEST in entries:
        raise UserError(
            f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, --overwrite to start it again "
            "(its run files are deleted), or another --out"
        )
    raise UserError(
        f"--out {run_dir} is not empty (it holds {few(entries)}); pick another --out, or pass --overwrite to "
        "replace the metapl run files in it"
    )


def check_out_path(out: str) -> Path:
    """The checks of ``check_out_dir`` that need no look inside the folder: a name, a folder, writable.

    Returns:
        The run directory (which may not exist yet).
    """
    if not str(out).strip():
        raise UserError("--out is empty; name a folder for the run, e.g. --out runs/mpl")
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pick another --out")
    # Found now rather than after loading the data: the nearest existing folder must be one we can write into.
    nearest = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not nearest.is_dir():
        raise UserError(f"--out {out} lies under {nearest}, which is a file; pick another --out")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {nearest} (permission denied or read-only); pick another --out")
    return run_dir


def clear_run_files(run_dir: Path) -> None:
    """Delete the files a run writes (``RUN_FILES``) from ``run_dir``; other files stay."""
    removed = []
    for name in RUN_FILES:
        path = run_dir / name
        with reporting_os_errors(path, "delete"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
        removed.append(name)
    if removed:
        logger.info(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
