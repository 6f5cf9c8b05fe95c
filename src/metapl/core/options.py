"""Options declared once: a dataclass field carries its help text and its allowed range, and one check enforces them.

``option(default, help, ge=..., gt=..., le=..., lt=...)`` declares a field. Its type annotation gives the kind:
``bool``, ``int``, ``float``, ``str`` or a ``Literal`` of choices, each optionally ``| None`` (then None is allowed and
the help says what it means). :func:`check_options` validates every field of a dataclass instance against its
declaration: type, choices, range, and NaN/inf refused for every float. ``MPLConfig`` calls it from
``__post_init__`` (raising ValueError), the trainer's ``TrainConfig`` too (raising ``UserError`` with flag names), and
the trainer builds its flags, ``--help`` lines and YAML keys from the same declarations.

Pure Python: no files, no command line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
) -> Any:  # a dataclasses.Field, standing as the field's default as field() does
    """A dataclass field with its help text and bounds (``ge`` ≤ value, ``gt`` < value, value ≤ ``le``, value < ``lt``).
    ``choices`` lists a ``str`` field's values where they come from a registry rather than a ``Literal`` type.

    The help says what the option does and, where a number has one, its unit; the range and the default are added
    wherever the help is shown.
    """
    bounds = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    listed = {"choices": tuple(choices)} if choices is not None else {}
    return dataclasses.field(default=default, metadata={"help": help, **bounds, **listed})


@dataclass(frozen=True)
class Spec:
    """One option as its declaration states it: the kind of value, None allowed or not, choices, help and bounds."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool
    choices: tuple | None
    help: str
    default: object
    bounds: dict

    def expected(self) -> str:
        """What a valid value is, in words: ``an integer >= 1``, ``a number in [0, 1)``, ``one of hard, soft``."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = _KINDS[self.kind]
            interval = _interval(self.bounds)
            if self.kind is float and not interval.startswith("in "):
                text = "a finite number"  # an interval [a, b] says that already
            text += f" {interval}" if interval else ""
        return text + (" or none" if self.optional else "")

    def problem(self, value: object) -> str | None:
        """Why ``value`` does not fit this option (``is out of range``), or None when it does."""
        if value is None:
            return None if self.optional else "is not allowed"
        if self.choices is not None:
            return None if value in self.choices else "is not a choice"
        if self.kind is bool:
            return None if isinstance(value, bool) else "is not true or false"
        if self.kind is str:
            return ("is empty" if not value else None) if isinstance(value, str) else "is not a string"
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return f"is not {_KINDS[self.kind]}"
        if not math.isfinite(value):
            return "is not finite"
        b = self.bounds
        inside = (
            ("ge" not in b or value >= b["ge"])
            and ("gt" not in b or value > b["gt"])
            and ("le" not in b or value <= b["le"])
            and ("lt" not in b or value < b["lt"])
        )
        return None if inside else "is out of range"


def _interval(bounds: dict) -> str:
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"
    if low:
        return (">= " if low[0] == "[" else "> ") + _number(low[1])
    if high:
        return ("<= " if high[1] == "]" else "< ") + _number(high[0])
    return ""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@functools.cache
def specs(cls: type[DataclassInstance]) -> dict[str, Spec]:
    """Every field of the dataclass ``cls`` (inherited ones first), by name."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, optional = hints[f.name], False
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, optional = args[0], len(args) < len(typing.get_args(tp))
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else f.metadata.get("choices")
        kind = type(choices[0]) if choices else tp
        bounds = {k: f.metadata[k] for k in ("ge", "gt", "le", "lt") if k in f.metadata}
        out[f.name] = Spec(f.name, kind, optional, choices, f.metadata.get("help", ""), f.default, bounds)
    return out


def check_value(spec: Spec, value: object, where: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` if ``value`` does not fit ``spec``: ``<where> <value> <problem>; use <what fits>``."""
    problem = spec.problem(value)
    if problem:
        raise error(f"{where} {value!r} {problem}; use {spec.expected()}")


def check_options(
    config: DataclassInstance, error: type[Exception] = ValueError, label: Callable[[str], str] | None = None
) -> None:
    """Check every field of the dataclass instance ``config`` against its declaration; raise ``error`` at the first
    bad one, naming the option (``label(name)``, default ``Class.name``), the value and what fits.
    """
    for name, spec in specs(type(config)).items():
        check_value(spec, getattr(config, name), label(name) if label else f"{type(config).__name__}.{name}", error)
