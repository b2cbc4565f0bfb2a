"""Sanity checks (see docs/checks.md). Each check is a class with ``measure`` (numbers) and
``judge`` (a verdict against configurable thresholds), registered by name; one file each.

Every module of this package is imported once (each check module registers its class; the
helper modules register nothing); an import error inside one is a bug and raises. A check
registered from elsewhere with :func:`register` is listed the same way.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import CHECKS, Batch, Check, Curve, MapSource, Measurement, Variant, register

__all__ = [
    "CHECKS",
    "Check",
    "Curve",
    "Batch",
    "MapSource",
    "Measurement",
    "Variant",
    "register",
    "check_names",
    "get_check",
]

_loaded = False


def _load() -> None:
    """Import every non-underscore module of this package once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    from ..plugins import load_entry_points

    load_entry_points("saliaudit.checks")


def check_names() -> list[str]:
    """All registered checks, in report order: by :attr:`Check.order`, then name."""
    _load()
    return sorted(CHECKS, key=lambda n: (CHECKS[n].order, n))


def get_check(name: str) -> type[Check]:
    """A check class by name; :class:`~saliaudit.errors.UsageError` lists the valid ones."""
    from ..errors import UsageError, suggest

    _load()
    try:
        return CHECKS[name]
    except KeyError:
        raise UsageError(
            f"unknown check {name!r}" + suggest(name, check_names()),
            hint="choose from " + ", ".join(check_names()),
        ) from None
