"""The one model registry, and ``create_model``: registered names, then torchvision, then ``timm:NAME``.

Every model the trainer can build comes through :func:`create_model`, so a bad name or an image size the network cannot
take fails at construction time with a one-line :class:`~metapl.errors.UserError`, not deep inside the first step.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from metapl.errors import UserError
from metapl.models.weights import load_into, torchvision_pretrained

logger = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

# Sizes tried, smallest first, to tell the user which --image-size would work; capped at 256 so that the search stays
# cheap even for large torchvision models (it only runs after the first dry forward has already failed).
_PROBE_SIZES = (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

# torchvision builders whose defaults make train mode return a namedtuple instead of logits; plain logits are what the
# trainer expects, and a user can still pass aux_logits=True explicitly.
_TV_DEFAULT_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False},
    "inception_v3": {"aux_logits": False},
}

_TV_PREFIX = "tv:"
_TIMM_PREFIX = "timm:"


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers a model factory under ``name``.

    Args:
        name: The name ``create_model`` will know the model by. It may not contain ``:``, which marks the ``tv:`` and
            ``timm:`` prefixes.

    Returns:
        A decorator that stores the factory and returns it unchanged. The factory is called as
        ``fn(*, num_classes, in_channels, dropout, **kwargs)`` and must return an ``nn.Module``.

    Raises:
        ValueError: if ``name`` is already registered or contains ``:``.
    """
    if ":" in name:
        raise ValueError(f"model name {name!r} may not contain ':' (reserved for the tv: and timm: prefixes)")

    def decorator(fn: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted.

    Returns:
        The names :func:`create_model` accepts without a prefix, besides torchvision's classification models.
    """
    return sorted(_REGISTRY)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters.

    Args:
        model: Any module.

    Returns:
        The total element count of the parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    dropout: float = 0.0,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name, freshly initialised or from its library's pretrained weights, and check that it
    takes ``image_size`` inputs.

    Resolution order: a registered name (:func:`list_models`); ``tv:NAME`` or a plain torchvision classification model
    name; ``timm:NAME`` when the optional package timm is installed.

    Args:
        name: Model name, e.g. ``"wrn28_2"``, ``"resnet18"``, ``"tv:vgg11"`` or ``"timm:resnet10t"``.
        num_classes: Number of output logits.
        in_channels: Channels of the input images (1 for grayscale); torchvision models get a new first conv.
        image_size: Side of the square images the model will see; used only for the dry forward check.
        dropout: Dropout probability before the final linear layer (for torchvision models an extra ``nn.Dropout``
            inserted in front of the final ``nn.Linear``; timm's ``drop_rate``).
        pretrained: start from the library's default pretrained weights (torchvision's through the torch hub cache,
            timm's through its own); a head of another class count is replaced and a 1-channel input stem gets the
            RGB kernels summed (each said in a line). metapl's own models have none.
        **kwargs: Passed on to the factory or builder unchanged.

    Returns:
        The model, in train mode, on the CPU, mapping ``(B, in_channels, image_size, image_size)`` to
        ``(B, num_classes)`` logits.

    Raises:
        UserError: for an unknown name, a missing timm, an image size the model cannot take, or pretrained weights
            that do not exist or cannot be had offline.
    """
    if name not in _REGISTRY and ":" not in name:
        from metapl.models.plugins import load_entry_points  # installed packages' models (metapl.models group)

        load_entry_points()
    model = _build(name, num_classes, in_channels, dropout, pretrained, **kwargs)
    _check_dry_forward(model, name, in_channels, image_size)
    return model


def _build(name: str, num_classes: int, in_channels: int, dropout: float, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``create_model``'s model from the first place that knows ``name``: metapl's registry, timm or torchvision."""
    if name in _REGISTRY:
        if pretrained:
            raise UserError(
                f"metapl's own {name!r} has no pretrained weights; pass a file with --teacher-weights / "
                "--student-weights, or pick a torchvision or timm: model"
            )
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, dropout=dropout, **kwargs)
    if name.startswith(_TIMM_PREFIX):
        return _create_timm(name[len(_TIMM_PREFIX) :], num_classes, in_channels, dropout, pretrained, **kwargs)
    tv_name = name[len(_TV_PREFIX) :] if name.startswith(_TV_PREFIX) else name
    if tv_name not in _torchvision_names():
        raise UserError(_unknown_name_message(name, tv_name))
    return _create_torchvision(tv_name, num_classes, in_channels, dropout, pretrained, **kwargs)


@functools.cache
def _torchvision_names() -> frozenset[str]:
    # module=torchvision.models keeps only the classification models (no detection, segmentation or video).
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _unknown_name_message(name: str, bare_name: str) -> str:
    """One line: the unknown name, the closest known ones, and every known name (metapl's registry, torchvision's
    classification models), with where timm's and the user's own come from."""
    tv = sorted(_torchvision_names())
    close = difflib.get_close_matches(bare_name, [*_REGISTRY, *tv], n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"unknown model {name!r}; {hint}use one of metapl's ({', '.join(_REGISTRY)}; your own: register_model and "
        f"--import), torchvision's classification models as NAME or tv:NAME ({', '.join(tv)}), or timm's as "
        "timm:NAME (pip install timm)"
    )


def _create_torchvision(
    name: str, num_classes: int, in_channels: int, dropout: float, pretrained: bool, **kwargs: Any
) -> nn.Module:
    builder_kwargs = {**_TV_DEFAULT_KWARGS.get(name, {}), **kwargs}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **builder_kwargs)
    if pretrained:  # loaded while the stem is RGB, before any layer is replaced or inserted
        load_into(model, torchvision_pretrained(name), f"torchvision's pretrained {name}")
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels, keep_weights=pretrained)
    if dropout > 0:
        _insert_dropout_before_classifier(model, name, num_classes, dropout)
    return model


def _replace_first_conv(model: nn.Module, name: str, in_channels: int, keep_weights: bool = False) -> None:
    """Give the model a stem for ``in_channels``; ``keep_weights``: a 1-channel stem sums the RGB kernels."""
    # named_modules() follows registration order, which for torchvision classifiers puts the stem first.
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            stem: Any = module  # torch types its kernel_size, stride, padding as tuple[int, ...], its constructor pairs
            new_conv = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=stem.kernel_size,
                stride=stem.stride,
                padding=stem.padding,
                dilation=stem.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            if keep_weights and in_channels == 1:
                with torch.no_grad():
                    new_conv.weight.copy_(module.weight.sum(dim=1, keepdim=True))
                    if module.bias is not None and new_conv.bias is not None:
                        new_conv.bias.copy_(module.bias)
            _set_submodule(model, module_name, new_conv)
            return
    raise UserError(f"model {name!r} has no 3-channel first convolution to adapt to in_channels={in_channels}")


def _insert_dropout_before_classifier(model: nn.Module, name: str, num_classes: int, dropout: float) -> None:
    # The last Linear producing num_classes outputs is the classifier in every torchvision model that has one.
    classifier = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not classifier:
        raise UserError(f"model {name!r} has no final nn.Linear to put dropout in front of; use dropout=0")
    linear = model.get_submodule(classifier[-1])
    _set_submodule(model, classifier[-1], nn.Sequential(nn.Dropout(dropout), linear))


def _set_submodule(model: nn.Module, dotted_name: str, new: nn.Module) -> None:
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def _create_timm(
    name: str, num_classes: int, in_channels: int, dropout: float, pretrained: bool, **kwargs: Any
) -> nn.Module:
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise UserError(f"model 'timm:{name}' needs the optional package timm: pip install timm") from None
    try:
        # timm adapts the head (num_classes) and the stem (in_chans) of its pretrained weights itself.
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, drop_rate=dropout, **kwargs
        )
    except RuntimeError as err:
        # timm raises RuntimeError("Unknown model (...)") for a name it does not know.
        raise UserError(f"timm cannot build 'timm:{name}' ({_first_line(err)}); see timm.list_models()") from None
    except OSError as err:  # pretrained weights neither in the Hugging Face cache nor downloadable
        raise UserError(
            f"cannot get timm's pretrained {name} weights ({_first_line(err)}); download them where there is internet "
            "into the Hugging Face cache ($HF_HOME) and copy it here, or pass --teacher-weights / --student-weights"
        ) from None


def _check_dry_forward(model: nn.Module, name: str, in_channels: int, image_size: int) -> None:
    reason = _forward_failure(model, in_channels, image_size, batch_size=2)
    if reason is None:
        return
    # Batch size 1 keeps the search for a working size cheap; eval-mode BatchNorm does not need a second sample.
    larger = (s for s in _PROBE_SIZES if s > image_size)
    working = next((s for s in larger if _forward_failure(model, in_channels, s, batch_size=1) is None), None)
    fix = f"choose --image-size ≥ {working}" if working else "choose a larger --image-size"
    size = f"{image_size}×{image_size}"
    raise UserError(f"model {name!r} cannot take images of size {size} ({reason}); {fix} or another model")


def _forward_failure(model: nn.Module, in_channels: int, image_size: int, batch_size: int) -> str | None:
    """Run one eval-mode forward on zeros; return the first line of the error, or None when it works."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch_size, in_channels, image_size, image_size))  # (B, C, S, S)
    # torchvision raises AssertionError (torch._assert) where a model needs one exact size, e.g. ViT's patch grid.
    except (RuntimeError, AssertionError) as err:
        return _first_line(err)
    finally:
        model.train(was_training)
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
