"""Weights to start a model from: a state-dict file (``torch.save`` or ``.safetensors``) or a library's pretrained
weights (torchvision's, timm's), fitted to a model whose classifier head or input channels may differ.

Files are read without executing pickled code: ``.safetensors`` holds tensors only, and every ``torch.load`` of the
package goes through ``load_weights_only`` (``weights_only=True``; the few NumPy types an old metapl checkpoint's
random-generator state holds are allow-listed). Where a run folder or a metapl checkpoint is the source,
``metapl.training.starting_weights`` picks the network in it.
"""

from __future__ import annotations

import logging
import pickle
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metapl.errors import UserError, few

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # common containers around a state dict
_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's


def read_file(path: str | Path) -> dict:
    """The object saved in ``path``: a ``.safetensors`` file's tensors, or a ``torch.save`` file loaded weights-only.

    Raises:
        UserError: a missing, unreadable or foreign file (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found; pass a .pt/.pth/.safetensors file or a metapl run folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = load_weights_only(path)
    except Exception as e:  # a torn file, pickled code, or not a weights file at all
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot read weights from {path} ({reason}); pass a state_dict saved with torch.save, a "
            ".safetensors file or a metapl checkpoint"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    return obj


def load_weights_only(path: str | Path) -> Any:  # what the file holds: a state dict, a checkpoint
    """``torch.load(path, weights_only=True)`` onto the CPU: reading a file runs no pickled code.

    A checkpoint of metapl 0.1 also held NumPy's generator state as an array (``np.random.get_state()``: a tuple with
    a uint32 array), so exactly those NumPy types (array reconstruction, nothing callable beyond it) are allowed on a
    second try. Errors are torch's: the callers name the file in one line.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        allowed: list[Callable | tuple[Callable, str]] = [
            np.ndarray,
            np.dtype,
            type(np.dtype(np.uint32)),
            _np_reconstruct(),
        ]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def _np_reconstruct() -> Callable:
    try:  # NumPy 2 moved the module; pickles name whichever wrote them, and both resolve to the same function
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]  # the same function, NumPy 1's path
    return _reconstruct


def as_state_dict(obj: dict, source: str | Path) -> dict[str, Tensor]:
    """The state dict inside ``obj`` (unwrapped from ``{"state_dict": ...}``-style containers, without DDP's
    ``module.`` or torch.compile's ``_orig_mod.`` prefixes).

    Raises:
        UserError: ``obj`` holds no tensors by name.
    """
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict) and not any(torch.is_tensor(v) for v in obj.values()):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            raise UserError(f"{source} is not a state dict ({key!r} holds a {type(value).__name__}, not a tensor)")
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    if not state:
        raise UserError(f"{source} holds no tensors; pass a state_dict of the model")
    return state


def load_into(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, fitting the two differences a new task brings; refuse any other mismatch.

    * A classifier head of another class count (the last ``nn.Linear``'s weight and bias) keeps the model's own
      fresh initialisation, and a line says so.
    * A first convolution made for 3-channel images, loaded into a 1-channel model, is summed over its input
      channels (grey = R = G = B gives the same response), and a line says so.

    Raises:
        UserError: missing or unexpected tensors, or other shapes that differ (one line naming the first few).
    """
    expected = model.state_dict()
    state = dict(state)
    head = _classifier_keys(model)
    if all(k in state for k in head) and any(state[k].shape != expected[k].shape for k in head):
        old = state[head[0]].shape[0]
        for k in head:
            del state[k]
        logger.info(
            f"{source}: the classifier head has {old} classes, the data {expected[head[0]].shape[0]}; "
            f"{head[0].rsplit('.', 1)[0]} is replaced by a new, randomly initialised layer"
        )
    for key, tensor in list(state.items()):
        want = expected.get(key)
        rgb_into_grey = tensor.ndim == 4 and tensor.shape[1] == 3  # an RGB stem into a 1-channel model
        if rgb_into_grey and want is not None and tuple(want.shape) == (tensor.shape[0], 1, *tensor.shape[2:]):
            state[key] = tensor.sum(dim=1, keepdim=True)
            logger.info(f"{source}: {key} summed over its 3 input channels for 1-channel images")
    problem = state_dict_mismatch({k: v for k, v in expected.items() if k in state or k not in head}, state)
    if problem:
        raise UserError(
            f"{source} does not fit {type(model).__name__}: {problem}; are these weights of another "
            "architecture? pass the matching --teacher/--student name"
        )
    model.load_state_dict(state, strict=False)


def _classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's last ``nn.Linear`` (its classifier head), weight first."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return []
    prefix = linears[-1] + "."
    return [k for k in model.state_dict() if k.startswith(prefix) and k.count(".") == prefix.count(".")]


def state_dict_mismatch(expected: dict, given: dict) -> str | None:
    """Describe the first way ``given`` fails to fit ``expected`` (both state dicts), or None when it fits.

    Checked here rather than by catching ``load_state_dict``'s RuntimeError: its message spans many lines and the CLI
    prints one, naming both shapes.
    """
    if not isinstance(given, dict):
        return f"expected a state dict, found {type(given).__name__}"
    for key, tensor in expected.items():
        if key in given and hasattr(given[key], "shape") and tuple(given[key].shape) != tuple(tensor.shape):
            have, want = tuple(given[key].shape), tuple(tensor.shape)
            return f"{key} has shape {have} in the checkpoint but the model expects {want}"
    absent = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    parts = []
    if absent:
        parts.append(f"{len(absent)} tensors missing ({few(absent)})")
    if extra:
        parts.append(f"{len(extra)} unexpected tensors ({few(extra)})")
    return ", ".join(parts) or None


def torchvision_pretrained(name: str) -> dict[str, Tensor]:
    """torchvision's default pretrained weights for ``name``, through its own loader and the torch hub cache.

    Raises:
        UserError: ``name`` has no pretrained weights, or they are not cached and cannot be downloaded (one line
            saying where to put the file).
    """
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for {name!r}; drop --pretrained for it") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise UserError(
            f"cannot get torchvision's pretrained {name} weights ({type(e).__name__}: not in the cache and no "
            f"download); fetch {weights.url} on a machine with internet and put it at {cached} (or set TORCH_HOME), "
            "or pass the file with --teacher-weights / --student-weights"
        ) from None
