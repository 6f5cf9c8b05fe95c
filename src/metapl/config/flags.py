"""The command line of a training config: one flag per ``TrainConfig`` field, in ``--help``'s groups, and the config
they resolve to (defaults < ``--config`` YAML file < flags).

Torch-free, as the rest of ``metapl.config`` (``metapl --help`` builds these flags).
"""

from __future__ import annotations

import argparse
from typing import Any

from metapl.config.fields import TrainConfig, _defaults, sections
from metapl.config.option_text import flag, help_line, parse_value
from metapl.config.recipes import find_config, load_yaml
from metapl.config.rules import drop_idle
from metapl.core.options import specs

_ALIASES = {"imports": ("--import",)}  # second spellings of a few flags


def add_config_arguments(parser: argparse.ArgumentParser, helps: dict[str, str] | None = None) -> None:
    """Add ``--config`` and one flag per ``TrainConfig`` field, in groups; flags default to "not given".

    Args:
        parser: the subcommand's parser.
        helps: option -> its whole ``--help`` line, for a command whose default differs from training's
            (``metapl compare``'s ``--out`` and ``--val-labeled``).
    """
    helps = helps or {}
    parser.add_argument(
        "--config", help="YAML file of defaults (keys as the flags, with _ or -); flags on the command line win"
    )
    known = specs(TrainConfig)
    for title, names in sections():
        group = parser.add_argument_group(title)
        for name in names:
            spec = known[name]
            kwargs: dict[str, Any] = {
                "dest": name,
                "default": argparse.SUPPRESS,
                "help": helps.get(name) or help_line(spec),
            }
            flags = ("--" + flag(name), *_ALIASES.get(name, ()))
            if spec.kind is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            elif spec.choices:
                group.add_argument(*flags, choices=spec.choices, **kwargs)
            else:
                group.add_argument(*flags, metavar=spec.kind.__name__.upper(), **kwargs)


def resolve(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` file < flags. The recipe's options that the flags make idle fall back to their
    defaults; an idle option given beside what idles it (both in the file, or both as flags) is refused
    (``metapl.config.rules``)."""
    recipe = load_yaml(find_config(args.config)) if getattr(args, "config", None) else {}
    given = given_options(args)
    values = drop_idle({**recipe, **given}, _defaults(), only=set(recipe) - set(given), causes=set(given))
    return TrainConfig(**values)


def given_options(args: argparse.Namespace) -> dict:
    """The ``TrainConfig`` options given as flags on the command line (not the defaults nor ``--config``), parsed."""
    return {
        name: parse_value(spec, getattr(args, name)) for name, spec in specs(TrainConfig).items() if hasattr(args, name)
    }
