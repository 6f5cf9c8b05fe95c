"""What a checkpoint holds, how it is written and restored (the run folder's file names: ``metapl.rundir.layout``).

A checkpoint is one flat dict saved with ``torch.save``: the config, the data's shape and normalisation (so that
``eval`` and ``predict`` rebuild the models from the file alone), the three networks, both optimizers, schedulers and
gradient scalers, the MPL state, the random generators, and a digest of the split. The split itself lives in
``split.json``; a checkpoint stores only its SHA-256, checked on resume, so that a ``split.json`` edited or copied
from another run is caught instead of silently training on other images (the index lists, up to tens of thousands
of integers, were pickled into every checkpoint and never read back).

Checkpoints are written atomically and only with finite weights (``nonfinite_weights``), so the newest file on disk is
always one a run can resume from. Every entry is a tensor or a plain Python value (the random generators' states
included), so checkpoints load weights-only (``metapl.models.weights.load_weights_only``): reading one runs no pickled
code.
``finetuned.pt`` is slim (``inference_state``): the models and what rebuilds them, no optimizer or generator state.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from metapl.core import unwrap
from metapl.errors import UserError, few, reporting_os_errors
from metapl.models.weights import load_weights_only, state_dict_mismatch
from metapl.rundir.layout import CONFIG, LATEST, LOCK, RUN_FILES, SPLIT

if TYPE_CHECKING:
    from metapl.data import Split
    from metapl.training.setup import Run

ROLES = ("teacher", "student", "ema")  # the networks a checkpoint holds (ema and teacher may be None)
# What rebuilding a model needs (eval, predict), and what resuming training needs on top.
MODEL_KEYS = ("config", "num_classes", "classes", "in_channels", "image_size", "mean", "std", "student")
RESUME_KEYS = MODEL_KEYS + (
    *("step", "seconds", "teacher", "ema", "t_opt", "s_opt", "t_sched", "s_sched"),
    *("t_scaler", "s_scaler", "mpl_state", "rng"),
)


def checkpoint_state(run: Run, *, with_training_state: bool = True) -> dict:
    """The flat checkpoint dict of a run (a ``metapl.training.setup.Run``).

    Args:
        run: the run.
        with_training_state: include what only resuming needs (optimizers, schedulers, scalers, MPL state, RNG).

    Returns:
        Models, optimizers, schedulers, scalers, RNG, the split's digest, the config and the data's shape.
    """
    state = {
        "config": run.cfg.to_dict(),
        "step": run.step,
        "seconds": run.seconds,
        "num_classes": run.data.num_classes,
        "classes": list(run.data.classes),
        "in_channels": run.data.in_channels,
        "image_size": run.data.image_size,
        "mean": list(run.data.mean),
        "std": list(run.data.std),
        "teacher": unwrap(run.teacher).state_dict(),
        "student": unwrap(run.student).state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "split_sha256": split_digest(run.split),
    }
    if not with_training_state:
        return state
    return state | {
        "t_opt": run.t_opt.state_dict(),
        "s_opt": run.s_opt.state_dict(),
        "t_sched": run.t_sched.state_dict(),
        "s_sched": run.s_sched.state_dict(),
        "t_scaler": run.t_scaler.state_dict() if run.t_scaler is not None else None,
        "s_scaler": run.s_scaler.state_dict() if run.s_scaler is not None else None,
        "mpl_state": run.state.state_dict(),
        "rng": rng_state(),
    }


def inference_state(run: Run, *, student: nn.Module | None = None) -> dict:
    """What ``finetuned.pt`` keeps of a run: the models and what rebuilds them (config, data shape,
    normalisation, classes), the step and the split's digest; no optimizer, scheduler, scaler or generator state.

    Args:
        run: a ``metapl.training.setup.Run``.
        student: the student network to store in place of ``run.student`` (the finetuned one), or None.

    Returns:
        A checkpoint dict with ``MODEL_KEYS``, ``step``, ``seconds``, ``teacher``, ``ema`` and
        ``split_sha256``.
    """
    full = checkpoint_state(run, with_training_state=False)
    if student is not None:
        full["student"] = unwrap(student).state_dict()
    return full


def restore(run: Run, ckpt: dict, source: str | Path) -> bool:
    """Load a checkpoint into a freshly built run, after checking that it belongs to this run and is finite.

    Args:
        run: a ``metapl.training.setup.Run`` whose models are not wrapped yet.
        ckpt: the checkpoint dict.
        source: where it came from, for messages.

    Returns:
        Whether the random generators were restored (False under another number of processes: the caller reseeds).

    Raises:
        UserError: missing entries, a checkpoint of other data (class count, channels, image size, split), weights
            that do not fit the models, or non-finite weights.
    """
    modules = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
    if run.ema is not None and ckpt.get("ema") is not None:
        modules["ema"] = run.ema.module
    _check_belongs(run, modules, ckpt, source)
    for role, module in modules.items():
        module.load_state_dict(ckpt[role])
    run.t_opt.load_state_dict(ckpt["t_opt"])
    run.s_opt.load_state_dict(ckpt["s_opt"])
    run.t_sched.load_state_dict(ckpt["t_sched"])
    run.s_sched.load_state_dict(ckpt["s_sched"])
    for scaler, key in ((run.t_scaler, "t_scaler"), (run.s_scaler, "s_scaler")):
        if scaler is not None and ckpt[key] is not None:
            scaler.load_state_dict(ckpt[key])
    state = ckpt["mpl_state"]
    if state["baseline"] is not None:
        state = {"baseline": state["baseline"].to(run.device)}
    run.state.load_state_dict(state)
    run.step, run.seconds = ckpt["step"], ckpt["seconds"]
    if run.ema is not None:
        run.ema.updates = run.step  # the EMA is updated once per step: its warm-up continues where it stopped
    # Each rank resumes its own generators (metapl.training.saver.CheckpointSaver); a single process takes rank 0's.
    ranks = ckpt.get("rng_ranks")
    if not run.dist.enabled:
        set_rng_state(ckpt["rng"])
    elif ranks is not None and len(ranks) == run.dist.world_size:
        set_rng_state(ranks[run.dist.rank])
    else:  # another world size: no exact resume is possible
        return False
    return True


def _check_belongs(run: Run, modules: dict[str, nn.Module], ckpt: dict, source: str | Path) -> None:
    """Refuse a checkpoint of another run (data shape, split, architecture) or with non-finite weights."""
    require_keys(ckpt, RESUME_KEYS, source)
    have = (int(ckpt["num_classes"]), int(ckpt["in_channels"]), int(ckpt["image_size"]))
    want = (run.data.num_classes, run.data.in_channels, run.data.image_size)
    if have != want:
        raise UserError(
            f"{source} was written for {have[0]} classes of {have[1]}-channel {have[2]}x{have[2]} images but this "
            f"run's data has {want[0]} classes of {want[1]}-channel {want[2]}x{want[2]} images; it belongs to "
            "another run: put this run's own checkpoint back, or start a new run"
        )
    digest = ckpt.get("split_sha256")
    if digest is not None and digest != split_digest(run.split):
        raise UserError(
            f"{SPLIT} beside {source} is not the split the checkpoint was trained on (edited, or copied from "
            f"another run?); put the run's own {SPLIT} back, or start a new run"
        )
    for role, module in modules.items():
        problem = state_dict_mismatch(module.state_dict(), ckpt[role])
        if problem:
            raise UserError(
                f"{source}: the {role} weights do not fit this run's {role} ({problem}); "
                "is it another run's checkpoint?"
            )
    refuse_nonfinite_weights(ckpt, source)


def split_digest(split: Split) -> str:
    """SHA-256 of a ``metapl.data.Split``'s index arrays: what a checkpoint keeps of its split."""
    h = hashlib.sha256()
    for name in ("labeled", "unlabeled", "val"):
        h.update(name.encode())
        h.update(np.ascontiguousarray(getattr(split, name), dtype=np.int64).tobytes())
    return h.hexdigest()


def require_keys(ckpt: dict, keys: tuple[str, ...], source: str | Path) -> None:
    """A ``UserError`` naming the entries of ``keys`` that ``ckpt`` lacks."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise UserError(f"{source} lacks {few(missing)}; is it a checkpoint written by metapl train?")


def nonfinite_weights(ckpt: dict) -> list[str]:
    """The networks of a checkpoint (``teacher``, ``student``, ``ema``) whose weights hold a NaN or an infinity.

    One reduction per network, on whatever device the tensors are: cheap next to writing them.
    """
    bad = []
    for role in ROLES:
        state = ckpt.get(role)
        tensors = [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()] if state else []
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            bad.append(role)
    return bad


def refuse_nonfinite_weights(ckpt: dict, source: str | Path, roles: tuple[str, ...] = ROLES) -> None:
    """A ``UserError`` when any of ``roles`` in ``ckpt`` holds non-finite weights (a diverged run's file)."""
    bad = [role for role in nonfinite_weights(ckpt) if role in roles]
    if bad:
        raise UserError(
            f"{source} holds non-finite (NaN/inf) {' and '.join(bad)} weights: the run diverged before it was saved; "
            "train again with lower learning rates (--t-lr, --s-lr, --finetune-lr) or --grad-clip"
        )


def atomic_save(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    A process killed at any moment leaves either the previous file or the new one, never a torn file. A full disk
    or a read-only folder is a ``UserError`` naming ``path``, and the previous file is kept.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with reporting_os_errors(path):
            with open(tmp, "wb") as f:
                try:
                    torch.save(obj, f)
                except RuntimeError as e:
                    # A full disk inside torch's zip writer is a RuntimeError, not an OSError: "[enforce fail at
                    # inline_container.cc:672] . unexpected pos ..."; the previous file is kept all the same.
                    first = (str(e).splitlines() or [type(e).__name__])[0][:100]
                    raise UserError(
                        f"cannot write {path} (torch.save failed: {first}); the disk is probably full: "
                        "free disk space or pick another folder"
                    ) from e
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def refuse_overwrite(
    output: str | Path, *, inputs: tuple[tuple[str | Path, str], ...] = (), own: tuple[str, ...] = ()
) -> None:
    """Refuse an ``--output`` that would overwrite an input of the command, a checkpoint, or another command's run file.

    Args:
        output: the file the command is about to write.
        inputs: ``(path, what it is)`` of everything the command reads (its checkpoint, its images).
        own: the run-folder file names this command writes itself (``eval``: ``eval.json``), which it may replace.

    Raises:
        UserError: naming what would be overwritten; nothing has been written.
    """
    out = Path(output)
    for path, what in inputs:
        if _same_path(out, Path(path)):
            raise UserError(
                f"--output {out} would overwrite {what} {path}, which this command reads; name another output file"
            )
    in_run = (out.parent / CONFIG).is_file() or (out.parent / LATEST).is_file()
    if in_run and out.name in (*RUN_FILES, LOCK) and out.name not in own:
        raise UserError(
            f"--output {out} would overwrite the run's {out.name} in {out.parent}; name another output file"
        )
    if out.is_file() and out.suffix in (".pt", ".pth"):
        raise UserError(f"--output {out} would overwrite a checkpoint; name another output file")


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` names the existing file ``b`` (through links and ``..`` too)."""
    return a.exists() and b.exists() and os.path.samefile(a, b)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU; a run directory means its latest checkpoint.

    Args:
        path: a ``.pt`` file or a run directory holding ``checkpoint.pt``.

    Returns:
        The checkpoint dict (see ``checkpoint_state``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; pass a run directory of metapl train or a .pt file it wrote")
    try:
        ckpt = load_weights_only(path)
    except Exception as e:  # a torn or foreign file: say which, not where inside torch it broke
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); is it a metapl checkpoint?") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "student" not in ckpt:
        raise UserError(f"{path} is not a metapl checkpoint (no config/student entries)")
    return ckpt


def rng_state() -> dict:
    """Every global random generator the training loop draws from, as tensors and plain Python values (NumPy's
    key array as an int64 tensor) so that a checkpoint loads with ``weights_only=True``."""
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # the legacy form, a tuple
    kind, key, pos, has_gauss, gauss = legacy
    numpy_state = (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.int64).astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
