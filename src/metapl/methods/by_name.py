"""The methods by ``--method`` name: one instance each, registered by its module (``metapl.methods`` imports them).

A new method is one module that subclasses ``metapl.methods.method.Method`` and calls ``register``, plus its import in
``metapl/methods/__init__.py``: the config, the trainer and the commands ask the method, never its name.
"""

from __future__ import annotations

from metapl.methods.method import Method

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its ``name``; a second method of the same name is refused (a ``ValueError``).

    Returns:
        The method, so that a module can write ``MPL = register(MPLMethod())``.
    """
    if not method.name or method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered (or the name is empty)")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method registered as ``name`` (a ``KeyError`` naming the known ones: a config is checked before)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; the methods are {', '.join(_METHODS)}") from None


def method_names() -> tuple[str, ...]:
    """The registered names, in registration order (``--method``'s choices)."""
    return tuple(_METHODS)


def methods_help() -> str:
    """``--method``'s help: each method's words, in registration order."""
    return "; ".join(m.help for m in _METHODS.values())
