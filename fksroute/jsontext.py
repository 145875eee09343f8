"""JSON text for the hot path: orjson, falling back to the standard library where orjson refuses.

Both give compact, strict JSON: a float JSON cannot carry (NaN, an overflow) becomes null, and
anything that is not JSON data (an object in a plugin's detail) becomes its str(). orjson
refuses integers past 64 bits and keys that are not strings; those take the slow path.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import orjson

# ASCII only: a string orjson refused may hold a lone surrogate, which no UTF-8 text can carry.
_COMPACT = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def encode(value: Any) -> bytes:
    """`value` as UTF-8 JSON text."""
    try:
        return orjson.dumps(value, default=str)
    except (orjson.JSONEncodeError, TypeError):
        return _slow(value).encode()


def text(value: Any) -> str:
    """`value` as JSON text."""
    try:
        return orjson.dumps(value, default=str).decode()
    except (orjson.JSONEncodeError, TypeError):
        return _slow(value)


def _slow(value: Any) -> str:
    try:
        return _COMPACT(value)
    except ValueError:  # a float JSON cannot carry
        return _COMPACT(finite(value))


def finite(value: Any) -> Any:
    """`value` with every infinite or NaN float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
