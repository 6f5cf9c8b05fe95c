"""How a ``TrainConfig`` option is written: its flag, its value parsed from a flag's text or YAML, its ``--help`` line.

Torch-free, as the rest of ``metapl.config`` (``metapl --help`` imports it).
"""

from __future__ import annotations

import contextlib

from metapl.core.options import Spec

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # a bool option's words


def flag(name: str) -> str:
    """An option's command-line spelling, without the dashes: ``t_lr`` -> ``t-lr``."""
    return name.replace("_", "-")


def parse_value(spec: Spec, value: object) -> object:
    """A flag's text or a YAML value as the option's type. Text that does not parse is returned unchanged, and the
    check then refuses it with the option's range."""
    if not isinstance(value, str):
        if spec.kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    text = value.strip().lower()
    if spec.optional and text in ("none", "null", ""):
        return None
    if spec.kind is bool:
        return True if text in _TRUE else False if text in _FALSE else value
    if spec.kind not in (int, float) or spec.choices:
        return value
    try:
        return int(text) if spec.kind is int else float(text)
    except ValueError:
        pass
    with contextlib.suppress(ValueError):
        number = float(text)
        if number.is_integer():
            return int(number)  # an integer written as 1e3
    return value


def help_line(spec: Spec) -> str:
    """A flag's ``--help`` line: what the option does, what values fit, its default."""
    text = f"{spec.help}; {spec.expected()}" if spec.kind in (int, float) else spec.help  # choices show in the usage
    return f"{text} (default: {shown(spec.default)})".replace("%", "%%")


def shown(value: object) -> str:
    """An option's value as a flag takes it: ``none``, ``true``/``false``, else as printed."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
