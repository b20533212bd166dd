"""Checks for numeric arguments, with one wording: a ValueError naming the argument and the range."""
from __future__ import annotations

import math
import numbers
from typing import Optional


def integer(value: object, name: str, minimum: int = 0, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int ``>= minimum`` (``None`` passes through where allowed); bools refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def real(value: object, name: str, low: float = -math.inf, high: float = math.inf,
         low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not math.isfinite(v) or not (v > low if low_open else v >= low) or v > high:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}]" if (low, high) != (-math.inf, math.inf) else ""
        raise ValueError(f"{name} must be a finite float{bounds}, got {value!r}")
    return v
