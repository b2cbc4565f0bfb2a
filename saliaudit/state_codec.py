"""A JSON codec for the saved work of an audit (``--resume``): no pickle, exact numbers.

Plain JSON values pass through; what JSON cannot say exactly is tagged: non-finite floats
(``{"__float__": "nan"}``), tuples, numeric NumPy arrays and tensors (raw little-endian
bytes in base64 with dtype and shape: float64 stays float64, bit for bit), dictionaries
whose keys are not plain strings, :class:`~saliaudit.maps.Variant`,
:class:`~saliaudit.checks.base.Measurement` and the result records. Anything else raises
:class:`TypeError` (the unit is then not saved, and a resumed audit recomputes it). Decoding
builds only these types: a state file can hold numbers and strings, never code.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

__all__ = ["encode", "decode"]

_TAGS = ("__float__", "__tuple__", "__array__", "__tensor__", "__dict__", "__variant__", "__m__", "__rec__")


def _records() -> dict[str, type]:
    from .result import CompletenessRecord, MapRecord

    return {"CompletenessRecord": CompletenessRecord, "MapRecord": MapRecord}


def _array(a: np.ndarray) -> dict[str, Any]:
    if a.dtype.kind not in "biuf":
        raise TypeError(f"cannot save an array of dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _unarray(d: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"unexpected dtype {dtype} in a saved array")
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=dtype).reshape(d["shape"]).astype(dtype.newbyteorder("="))


def encode(o: Any) -> Any:
    """``o`` as JSON-ready data (strict JSON: no NaN literals); :class:`TypeError` for a
    type it cannot save exactly."""
    from .checks.base import Measurement
    from .maps import Variant

    if o is None or isinstance(o, (bool, str)):
        return o
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if math.isfinite(f) else {"__float__": repr(f)}
    if isinstance(o, list):
        return [encode(x) for x in o]
    if isinstance(o, tuple):
        return {"__tuple__": [encode(x) for x in o]}
    if isinstance(o, np.ndarray):
        return {"__array__": _array(o)}
    if isinstance(o, torch.Tensor):
        return {"__tensor__": _array(o.detach().cpu().numpy())}
    if isinstance(o, Variant):
        return {"__variant__": [o.method, o.psi, o.post, o.signed]}
    if isinstance(o, Measurement):
        return {"__m__": {k: encode(v) for k, v in vars(o).items()}}
    if type(o).__name__ in _records() and isinstance(o, _records()[type(o).__name__]):
        return {"__rec__": [type(o).__name__, encode(asdict(o))]}
    if isinstance(o, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in o):
            return {k: encode(v) for k, v in o.items()}
        return {"__dict__": [[encode(k), encode(v)] for k, v in o.items()]}
    raise TypeError(f"cannot save a {type(o).__name__}")


def decode(o: Any) -> Any:
    """The inverse of :func:`encode`."""
    from .checks.base import Measurement
    from .maps import Variant

    if isinstance(o, list):
        return [decode(x) for x in o]
    if not isinstance(o, dict):
        return o
    if len(o) == 1:
        ((tag, v),) = o.items()
        if tag == "__float__":
            return float(v)
        if tag == "__tuple__":
            return tuple(decode(x) for x in v)
        if tag == "__array__":
            return _unarray(v)
        if tag == "__tensor__":
            return torch.from_numpy(_unarray(v).copy())
        if tag == "__dict__":
            return {_hashable(decode(k)): decode(x) for k, x in v}
        if tag == "__variant__":
            return Variant(v[0], v[1], v[2], bool(v[3]))
        if tag == "__m__":
            return Measurement(**{k: decode(x) for k, x in v.items()})
        if tag == "__rec__":
            return _records()[v[0]](**decode(v[1]))
    return {k: decode(v) for k, v in o.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k
