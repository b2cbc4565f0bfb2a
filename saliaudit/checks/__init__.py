"""Sanity checks (see docs/checks.md). Each check is a class with ``measure`` (numbers) and
``judge`` (a verdict against configurable thresholds), registered by name; one file each."""

from __future__ import annotations

import importlib

from .base import CHECKS, Batch, Check, MapSource, Measurement, Variant, register

__all__ = ["CHECKS", "Check", "Batch", "MapSource", "Measurement", "Variant", "register",
           "check_names", "get_check"]

#: Check modules, in report order (each registers its class when imported).
_MODULES = ("completeness", "class_sensitivity", "randomization", "perturbation",
            "sensitivity_n", "sign_flip", "bn_folding", "pointing_game")


def _load() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise


def check_names() -> list[str]:
    """All registered checks, in report order."""
    _load()
    order = {name: i for i, name in enumerate(_MODULES)}
    return sorted(CHECKS, key=lambda n: order.get(n, len(order)))


def get_check(name: str) -> type[Check]:
    """A check class by name; :class:`~saliaudit.errors.UsageError` lists the valid ones."""
    from ..errors import UsageError

    _load()
    try:
        return CHECKS[name]
    except KeyError:
        raise UsageError(f"unknown check {name!r}",
                         hint="choose from " + ", ".join(check_names())) from None
