"""The configs shipped in the package (``metapl/configs/*.yaml``, the recipes), the file ``--config`` names, and how a
YAML config file is read."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from metapl.config.fields import TrainConfig
from metapl.config.option_text import parse_value
from metapl.core.options import check_value, specs
from metapl.errors import UserError


def shipped_configs() -> dict[str, Path]:
    """The configs shipped inside the package (``metapl/configs/*.yaml``): name -> file."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_config(name: str | Path) -> Path:
    """The file ``--config`` names: a path as given, or a bare name (no folder, no extension) of a shipped config.

    Args:
        name: ``configs/my.yaml``, ``my.yaml`` or ``cifar10_4k``.

    Returns:
        The path to read (``load_yaml`` reports a path that does not exist).

    Raises:
        UserError: a bare name that is neither a file here nor a shipped config, listing the shipped names.
    """
    path = Path(name)
    if path.exists() or path.suffix or len(path.parts) != 1:
        return path
    shipped = shipped_configs()
    if str(name) in shipped:
        return shipped[str(name)]
    raise UserError(f"unknown config {str(name)!r}; the shipped configs are {', '.join(shipped)}, or pass a YAML file")


def load_yaml(path: str | Path) -> dict:
    """Read a config file and check its keys against ``TrainConfig``.

    Args:
        path: a YAML mapping of field names (``num_labeled`` or ``num-labeled``) to values.

    Returns:
        The mapping with canonical names and coerced values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    known = specs(TrainConfig)
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see metapl train --help for the keys"
            raise UserError(f"unknown key {key!r} in config file {path}{hint}")
        out[name] = parse_value(known[name], value)
        check_value(known[name], out[name], f"config file {path}: {name}", UserError)
    return out
