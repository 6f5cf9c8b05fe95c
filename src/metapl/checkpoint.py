"""Checkpoints written atomically, and the random-number state that makes a resumed run bit-identical."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from metapl.errors import UserError

LATEST = "checkpoint.pt"
BEST = "best.pt"


def atomic_save(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    A process killed at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU; a run directory means its latest checkpoint.

    Args:
        path: a ``.pt`` file or a run directory holding ``checkpoint.pt``.

    Returns:
        The checkpoint dict (see ``metapl.train``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; pass a run directory of metapl train or a .pt file it wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say which, not where inside torch it broke
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); is it a metapl checkpoint?") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "student" not in ckpt:
        raise UserError(f"{path} is not a metapl checkpoint (no config/student entries)")
    return ckpt


def rng_state() -> dict:
    """Every global random generator the training loop draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
