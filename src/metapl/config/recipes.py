"""The configs shipped in the package (``metapl/configs/*.yaml``, the recipes) and the file ``--config`` names."""

from __future__ import annotations

from pathlib import Path

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
