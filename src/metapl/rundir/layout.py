"""The run folder: the names of the files one run writes, and the reads and writes of its config, summary and split.

A run directory holds ``config.yaml`` (the resolved config), ``split.json`` (the labeled / unlabeled / validation
indices and the data fingerprint, ``metapl.data.split``), ``checkpoint.pt`` (latest), ``finetuned.pt``,
``metrics.jsonl``, ``tb/`` (TensorBoard), ``wandb/`` and ``wandb-id`` (Weights & Biases), ``train.log`` and
``summary.json`` (final accuracies); the commands add ``eval.json``, ``curves.png`` and ``export/``. The checkpoints'
contents belong to ``metapl.engine.checkpoint``.

Importing this module does not import torch: the command line names the run files in its ``--help``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from metapl.engine.config import TrainConfig, config_from_dict
from metapl.errors import UserError, reporting_os_errors

CONFIG = "config.yaml"  # the resolved config (metapl.engine.config)
SPLIT = "split.json"  # labeled / unlabeled / validation indices and the data fingerprint (metapl.data.split)
METRICS = "metrics.jsonl"  # one JSON record per logged step (metapl.engine.metrics)
SUMMARY = "summary.json"  # final accuracies
LATEST = "checkpoint.pt"  # the latest checkpoint: what --resume continues from
FINETUNED = "finetuned.pt"  # checkpoint.pt with the finetuned student (metapl.engine.finetune)
FINETUNE_PROGRESS = "finetune-progress.pt"  # a finetuning stopped by a signal, to continue (metapl.engine.finetune)
EVAL_JSON = "eval.json"  # metapl eval's result
CURVES = "curves.png"  # metapl plot's default image
TENSORBOARD = "tb"  # TensorBoard event files
WANDB = "wandb"  # Weights & Biases' folder (--wandb; offline runs stay there until `wandb sync`)
WANDB_ID = "wandb-id"  # the W&B run id of this run folder, so that --resume continues the same W&B run
EXPORT_DIR = "export"  # metapl export's default folder (metapl.engine.exported)
TRAIN_LOG = "train.log"  # the lines metapl train showed on the terminal (metapl.engine.metrics.LogFile)
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

# The one-writer lock (metapl.engine.lock). Not among RUN_FILES: --overwrite runs while its own process holds it, and a
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


def save_run_split(split, run_dir: str | Path) -> None:
    """Write the run's ``split.json`` (``metapl.data.save_split``)."""
    from metapl.data import save_split  # the data package imports torch; this module stays light

    save_split(split, Path(run_dir) / SPLIT)


def load_run_split(run_dir: str | Path):
    """The run's saved split (``metapl.data.load_split`` of ``split.json``)."""
    from metapl.data import load_split

    return load_split(Path(run_dir) / SPLIT)
