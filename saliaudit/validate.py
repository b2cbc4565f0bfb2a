"""Parameter checks shared by the configuration, the checks and the saliency methods.

Every function returns the value it accepted (converted: ``int``, ``float``, ``str``, ...)
and raises :class:`InvalidValue`, a :class:`~saliaudit.errors.UsageError` (exit 2), whose
message names the parameter, the value and what was expected::

    invalid sensitivity_n.points: expected an integer at least 1, got 0

One rule everywhere:

* **Integers** are integral *types*: ``int`` and NumPy integers. ``bool`` is not an integer
  (``True`` is a mistake, not 1), and neither is a float, even an integral one: ``3.0`` is
  rejected. A float where a count is expected usually means a fraction or a unit was mixed
  up, and the configuration has always rejected ``batch_size = 8.0``; the checks and the
  methods now do the same.
* **Numbers** are finite ``int``/``float`` (NumPy scalars included), never ``bool`` or text.
* **Text** from flags, environment variables or files is parsed *before* these functions
  are called (:mod:`saliaudit.config` does that); they never parse strings.
* ``allow_none=True``: ``None`` is a valid value (e.g. ``max_images = null``: all images)
  and is returned as is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import UsageError

__all__ = ["InvalidValue", "integer", "number", "fraction", "fractions", "choice", "boolean"]


class InvalidValue(UsageError):
    """A parameter value outside its valid range (exit 2). ``name``, ``value`` and
    ``expected`` (e.g. ``"an integer at least 1"``) are kept for callers that reword it."""

    def __init__(self, name: str, value: Any, expected: str, hint: str | None = None):
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"invalid {name}: expected {expected}, got {value!r}", hint=hint)


def _bounds(min: Any, max: Any, *, min_open: bool = False, max_open: bool = False) -> str:
    if min is not None and max is not None:
        if not min_open and not max_open:
            return f"between {min} and {max}"
        return f"in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
    if min is not None:
        return f"{'greater than' if min_open else 'at least'} {min}"
    if max is not None:
        return f"{'less than' if max_open else 'at most'} {max}"
    return ""


def _expected(kind: str, bounds: str, allow_none: bool) -> str:
    text = f"{kind} {bounds}".strip()
    return f"{text} or null" if allow_none else text


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def integer(
    name: str,
    value: Any,
    *,
    min: int | None = None,
    max: int | None = None,
    allow_none: bool = False,
    hint: str | None = None,
) -> int | None:
    """``value`` as an ``int`` with ``min <= value <= max`` (either bound optional)."""
    if value is None and allow_none:
        return None
    if not _is_integer(value) or (min is not None and value < min) or (max is not None and value > max):
        raise InvalidValue(name, value, _expected("an integer", _bounds(min, max), allow_none), hint)
    return int(value)


def rows(name: str, value: Any) -> int | None:
    """A ``chunk``-like parameter: rows per pass, at least 1, or ``None`` for the audit's
    automatic rows per pass (:func:`saliaudit.cost.rows_per_pass`)."""
    return integer(name, value, min=1, allow_none=True, hint="null: set from the model's activation memory")


def number(
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool = False,
    hint: str | None = None,
) -> float | None:
    """``value`` as a finite ``float`` within ``[min, max]`` (``min_open``/``max_open``: the
    bound itself is excluded, e.g. ``min=0, min_open=True`` for a positive number)."""
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value)
    if ok and min is not None:
        ok = value > min if min_open else value >= min
    if ok and max is not None:
        ok = value < max if max_open else value <= max
    if not ok:
        kind = "a positive number" if (min == 0 and min_open and max is None) else "a number"
        bounds = (
            "" if kind == "a positive number" else _bounds(min, max, min_open=min_open, max_open=max_open)
        )
        raise InvalidValue(name, value, _expected(kind, bounds, allow_none), hint)
    return float(value)


def fraction(name: str, value: Any, *, allow_none: bool = False, hint: str | None = None) -> float | None:
    """``value`` as a float in ``(0, 1]``."""
    return number(name, value, min=0, max=1, min_open=True, allow_none=allow_none, hint=hint)


def fractions(name: str, value: Any, *, hint: str | None = None) -> list[float]:
    """A fraction or a non-empty list of fractions in ``(0, 1]``: sorted, distinct floats."""
    items = [value] if _is_number(value) else value
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes, dict)):
        items = None
    else:
        items = list(items)
    if not items or not all(_is_number(f) and math.isfinite(f) and 0 < f <= 1 for f in items):
        raise InvalidValue(
            name, value, "a list of fractions in (0, 1]", hint or f"e.g. {name}=[0.01 0.05 0.1]"
        )
    return sorted({float(f) for f in items})


def choice(name: str, value: Any, choices: Iterable[str], *, hint: str | None = None) -> str:
    """``value`` when it is one of ``choices`` (compared exactly)."""
    options = [str(c) for c in choices]
    if not isinstance(value, str) or value not in options:
        raise InvalidValue(name, value, f"one of {', '.join(options)}", hint)
    return value


def boolean(name: str, value: Any, *, hint: str | None = None) -> bool:
    """``value`` when it is ``True`` or ``False`` (NumPy booleans included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidValue(name, value, "true or false", hint)
    return bool(value)
