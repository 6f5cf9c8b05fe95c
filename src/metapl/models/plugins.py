"""The user's own models, made known to every command: modules named with ``--import`` and the ``metapl.models``
entry-point group.

A module registers its factories with ``@metapl.models.register_model("my_r18")`` when it is imported. ``metapl
train --import mypkg.models`` imports it before the models are built and records the name in the run's
``config.yaml`` (``imports``), so that ``eval``, ``predict``, ``finetune``, ``export`` and ``--resume`` on that run
import it again. An installed package can instead declare, in its ``pyproject.toml``::

    [project.entry-points."metapl.models"]
    mypkg = "mypkg.models"

and every command loads it on its first unknown model name (``load_entry_points``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

from metapl.errors import UserError

ENTRY_POINT_GROUP = "metapl.models"
_loaded_entry_points = False


def as_module_list(imports: str | Iterable[str] | None) -> list[str]:
    """``--import`` as a list of module names: a comma-separated string, a list, or None (no modules)."""
    if not imports:
        return []
    items = imports.split(",") if isinstance(imports, str) else list(imports)
    return [m.strip() for m in items if m.strip()]


def import_model_modules(imports: str | Iterable[str] | None) -> list[str]:
    """Import the modules ``imports`` names (their ``register_model`` calls run on import).

    Args:
        imports: module names (``mypkg.models``), comma-separated or as a list.

    Returns:
        The module names imported.

    Raises:
        UserError: a module that cannot be imported (not found, or an error while importing it), named in one line.
    """
    names = as_module_list(imports)
    for name in names:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError or whatever the module's own code raised: one line, not a traceback
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(
                f"cannot import model module {name!r} ({type(e).__name__}: {reason}); check --import and that the "
                "module is on PYTHONPATH (or installed)"
            ) from None
    return names


def load_entry_points() -> list[str]:
    """Import every installed ``metapl.models`` entry point once; returns their names (empty when there are none)."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return []
    _loaded_entry_points = True
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e)[:120]}"
            raise UserError(
                f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) fails to import "
                f"({reason}); reinstall or remove that package"
            ) from None
        names.append(ep.name)
    return names
