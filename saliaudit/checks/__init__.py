"""Sanity checks (design.md §4). Each check is a class with ``measure`` (numbers) and
``judge`` (a verdict against configurable thresholds), registered by name."""

from __future__ import annotations

from .base import CHECKS, Check, register
from . import completeness  # noqa: F401  (registers)

__all__ = ["CHECKS", "Check", "register"]
