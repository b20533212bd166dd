"""Sparsity allocation: per-layer overrides, and global ranking bounded by per-layer floors/caps.

Overrides (``prune(..., overrides=...)``) map layers to a setting: a float (layer scope: that
layer's sparsity; global scope: floor = cap = it, pinning the layer), a ``(floor, cap)`` pair
(global scope; ``None`` in either slot keeps the default), or ``None`` / ``0`` (do not prune,
the same as ``exclude``). The mapping is a dict whose keys are qualified layer names, fnmatch
globs or module types, or a callable ``(name, module) -> setting or None`` (``None``: default).
Precedence, most specific first: ``exclude`` > exact name > glob > type (globs and types in dict
order, first match wins). A dict key matching no prunable layer raises, like ``exclude``.
"""

from __future__ import annotations

import math
import numbers
from fnmatch import fnmatchcase
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .ranking import _bits_to_float, _float_to_key

Bounds = tuple[float, float]  # (floor, cap): fractions of a layer's units to remove
Overrides = Union[dict, Callable[[str, nn.Module], object]]
_DEFAULT = object()  # "no override for this layer"


def _fraction(value: object, what: str, upper_inclusive: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    x = float(value) if ok else math.nan
    if not ok or math.isnan(x) or x < 0.0 or x > 1.0 or (x == 1.0 and not upper_inclusive):
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{what} must be a float in {interval}, got {value!r}")
    return x


def check_bounds(min_sparsity: object, max_sparsity: object) -> Bounds:
    """The default per-layer (floor, cap) for global scope; caps may reach 1 (whole layer)."""
    lo = 0.0 if min_sparsity is None else _fraction(min_sparsity, "min_sparsity")
    hi = 1.0 if max_sparsity is None else _fraction(max_sparsity, "max_sparsity", True)
    if lo > hi:
        raise ValueError(f"min_sparsity={lo:g} exceeds max_sparsity={hi:g}")
    return lo, hi


def _raw_settings(layers: dict[str, nn.Module], overrides: Optional[Overrides]) -> dict:
    """Layer name -> its raw override value (layers without one are absent)."""
    if overrides is None:
        return {}
    if callable(overrides) and not isinstance(overrides, dict):
        found = {name: overrides(name, m) for name, m in layers.items()}
        return {n: v for n, v in found.items() if v is not None}
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict or a callable, got {overrides!r}")
    names, globs, types = {}, [], []
    for key, value in overrides.items():
        if isinstance(key, type) and issubclass(key, nn.Module):
            types.append((key, value))
        elif isinstance(key, str) and key in layers:
            names[key] = value
        elif isinstance(key, str):
            globs.append((key, value))
        else:
            raise TypeError(f"overrides keys must be names, globs or nn.Module types, got {key!r}")
    unmatched = [p for p, _ in globs if not any(fnmatchcase(n, p) for n in layers)]
    unmatched += [t.__name__ for t, _ in types if not any(isinstance(m, t) for m in layers.values())]
    if unmatched:
        raise ValueError(f"overrides keys match no prunable layer: {unmatched}")
    out = {}
    for name, module in layers.items():
        if name in names:
            out[name] = names[name]
            continue
        hit = next((v for p, v in globs if fnmatchcase(name, p)), _DEFAULT)
        if hit is _DEFAULT:
            hit = next((v for t, v in types if isinstance(module, t)), _DEFAULT)
        if hit is not _DEFAULT:
            out[name] = hit
    return out


def _is_skip(value: object) -> bool:
    return value is None or (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0
    )


def resolve_limits(
    layers: dict[str, nn.Module],
    overrides: Optional[Overrides],
    scope: str,
    sparsity: float,
    default: Bounds,
    fixed: bool,
) -> dict[str, Bounds]:
    """(floor, cap) per layer still pruned; overridden-out layers are dropped. Read-only.

    Layer scope: floor = cap = the layer's sparsity. With a structure that fixes its own
    sparsity (N:M) only exclusion (None / 0) is accepted.
    """
    # A callable answers None for "default", so 0 is its only way to skip a layer.
    raw = _raw_settings(layers, overrides)
    limits: dict[str, Bounds] = {}
    for name in layers:
        value = raw.get(name, _DEFAULT)
        if value is not _DEFAULT and _is_skip(value):
            continue
        what = f"overrides[{name!r}]"
        if value is _DEFAULT:
            limits[name] = (sparsity, sparsity) if scope == "layer" else default
        elif fixed:
            raise ValueError(
                f"{what}={value!r}: the structure fixes every layer's sparsity; overrides can "
                "only exclude layers (None or 0)"
            )
        elif isinstance(value, tuple):
            if scope != "global" or len(value) != 2:
                raise ValueError(f"{what}={value!r}: a (floor, cap) pair needs scope='global'")
            lo = default[0] if value[0] is None else _fraction(value[0], f"{what} floor")
            hi = default[1] if value[1] is None else _fraction(value[1], f"{what} cap", True)
            if lo > hi:
                raise ValueError(f"{what}: floor {lo:g} exceeds cap {hi:g}")
            limits[name] = (lo, hi)
        else:
            s = _fraction(value, what)
            limits[name] = (s, s)
    if not limits:
        raise ValueError("model has no prunable layers left after `exclude` and `overrides`")
    return limits


def unit_bounds(limits: Sequence[Bounds], n_units: Sequence[int]) -> tuple[list[int], list[int]]:
    """Fractions to unit counts: round(floor * units), round(cap * units)."""
    return [round(lo * n) for (lo, _), n in zip(limits, n_units)], [
        round(hi * n) for (_, hi), n in zip(limits, n_units)
    ]


def check_feasible(floors: Sequence[int], caps: Sequence[int], k: int, names, unit: str) -> None:
    if sum(floors) > k:
        raise ValueError(
            f"per-layer floors remove {sum(floors)} {unit}s, more than the total {k} "
            f"({dict(zip(names, floors))}); lower min_sparsity / the overrides or raise sparsity"
        )
    if sum(caps) < k:
        raise ValueError(
            f"per-layer caps allow only {sum(caps)} {unit}s, fewer than the total {k} "
            f"({dict(zip(names, caps))}); raise max_sparsity / the overrides or lower sparsity"
        )


def bounded_lowest(
    unit_scores: Sequence[Tensor],
    unit_sizes: Sequence[int],
    target: int,
    floors: Sequence[int],
    caps: Sequence[int],
) -> list[int]:
    """Units to remove per layer: each layer's ``floors[i]`` lowest are forced, units past
    ``caps[i]`` in a layer are never taken, and the rest go in global stable order (ties:
    earlier layer, then lower index) until the removed weight total is nearest ``target``.

    Equal unit sizes make the total exact (the caller checked floors <= target <= caps).
    A stable sort of all units: O(n log n) time, a few n-sized temporaries.
    """
    flat = torch.cat([s.reshape(-1).double().cpu() for s in unit_scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(unit_scores)])
    order = torch.sort(flat, stable=True).indices
    who = owner[order]
    # Rank of each sorted unit within its own layer (= its rank in that layer's stable sort).
    by_layer = torch.sort(who, stable=True).indices
    starts = torch.cumsum(torch.bincount(who, minlength=len(unit_scores)), 0) - torch.bincount(
        who, minlength=len(unit_scores)
    )
    rank = torch.empty_like(who)
    rank[by_layer] = torch.arange(len(who)) - starts[who[by_layer]]
    floor_t, cap_t = torch.tensor(list(floors)), torch.tensor(list(caps))
    forced = rank < floor_t[who]
    eligible = ~forced & (rank < cap_t[who])
    size = torch.tensor(list(unit_sizes), dtype=torch.float64)[who]
    base = float(size[forced].sum())
    cum = base + torch.cumsum(size[eligible], 0)
    k = int(torch.searchsorted(cum, torch.tensor([float(target)], dtype=torch.float64), right=True))
    below = float(cum[k - 1]) if k else base
    if k < len(cum) and float(cum[k]) - target < target - below:
        k += 1  # the next unit lands strictly closer to the target
    taken = forced.clone()
    taken[eligible.nonzero().squeeze(1)[:k]] = True
    return torch.bincount(who[taken], minlength=len(unit_scores)).tolist()


def bounded_split_lowest(
    scores: Sequence[Tensor], k: int, floors: Sequence[int], caps: Sequence[int]
) -> list[int]:
    """:func:`bounded_lowest` for equal unit sizes, without sorting: the same counts.

    Removing everything at or below a threshold t, clamped per layer, removes
    ``sum(min(cap, max(floor, #{s <= t})))`` -- monotone in t -- so a bisection over the floats'
    order keys finds the smallest t reaching k (as ``kth_smallest`` does); ties at t then go to
    earlier layers, each up to its cap. Memory: one layer's bool temporary at a time.
    """
    def clamp(i: int, n: int) -> int:
        return min(caps[i], max(floors[i], n))

    dtype = torch.float32
    for s in scores:
        dtype = torch.promote_types(dtype, s.dtype)

    def count(t: Tensor, strict: bool) -> list[int]:
        t = t.to(dtype)
        return [int(((s.to(dtype) < t) if strict else (s.to(dtype) <= t)).sum()) for s in scores]

    lo, hi = _float_to_key(float("-inf"), dtype), _float_to_key(float("inf"), dtype)
    while lo < hi:
        mid = (lo + hi) // 2
        at = count(_bits_to_float(mid, dtype), strict=False)
        if sum(clamp(i, n) for i, n in enumerate(at)) >= k:
            hi = mid
        else:
            lo = mid + 1
    t = _bits_to_float(lo, dtype)
    less, upto = count(t, strict=True), count(t, strict=False)
    counts = [clamp(i, n) for i, n in enumerate(less)]
    need = k - sum(counts)  # >= 0: the total at any t' < t falls short of k
    for i in range(len(scores)):
        extra = min(need, clamp(i, upto[i]) - counts[i])
        counts[i] += extra
        need -= extra
    return counts
