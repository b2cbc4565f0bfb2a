"""The check protocol and registry."""

from __future__ import annotations

from typing import Any, ClassVar

from ..result import CheckResult

CHECKS: dict[str, type["Check"]] = {}


def register(cls: type["Check"]) -> type["Check"]:
    """Class decorator: make a check available by its ``name``."""
    CHECKS[cls.name] = cls
    return cls


class Check:
    """A sanity check. ``measure`` returns numbers; ``judge`` turns them into a verdict.

    Attributes:
        name: registry name (``--checks``).
        summary: what it tests, in one sentence, with the paper.
        thresholds: default thresholds, overridable by configuration.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    thresholds: ClassVar[dict[str, float]] = {}

    def measure(self, **inputs: Any) -> dict[str, Any]:
        raise NotImplementedError

    def judge(self, measurement: dict[str, Any], thresholds: dict[str, float]) -> CheckResult:
        raise NotImplementedError
