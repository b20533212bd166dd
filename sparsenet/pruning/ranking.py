"""Exact lowest-k selection with deterministic ties, without sorting everything.

Both functions find the k-th smallest score (``kthvalue`` within one tensor; a bisection over the
values across many, see ``kth_smallest``), take everything strictly below it, and hand the remaining
quota to the tied elements in index order. The result is exactly what a stable sort would remove,
so counts are exact even when all scores are equal.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _as_float(scores: Tensor) -> Tensor:
    # kthvalue lacks half-precision kernels on some backends; float32 holds fp16/bf16
    # exactly, so the order is unchanged.
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Bool tensor shaped like ``scores``, True at its ``k`` lowest entries (ties: lowest index)."""
    flat = _as_float(scores).reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    t = flat.kthvalue(k).values
    chosen = flat < t
    need = k - int(chosen.sum())
    if need > 0:
        chosen[(flat == t).nonzero().squeeze(1)[:need]] = True
    return chosen.view(scores.shape)


def _sortable_bits(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    return (torch.int64, 64) if dtype == torch.float64 else (torch.int32, 32)


def _float_to_key(value: float, dtype: torch.dtype) -> int:
    int_dtype, bits = _sortable_bits(dtype)
    raw = int(torch.tensor([value], dtype=dtype).view(int_dtype)[0])
    return raw if raw >= 0 else raw ^ ((1 << (bits - 1)) - 1)


def _bits_to_float(key: int, dtype: torch.dtype) -> Tensor:
    """The float whose order key (see kth_smallest) is ``key``."""
    int_dtype, bits = _sortable_bits(dtype)
    flip = (1 << (bits - 1)) - 1
    raw = key if key >= 0 else key ^ flip  # the map is its own inverse
    return torch.tensor([raw], dtype=int_dtype).view(dtype)[0]


def kth_smallest(scores: Sequence[Tensor], k: int, dtype: torch.dtype) -> Tensor:
    """The k-th smallest value (1-based) of all ``scores`` together, without concatenating them.

    Bisection over the floats' order keys (the bit pattern read as a signed integer, with the
    magnitude bits of negatives flipped, orders floats like numbers): 32 passes for float32, each
    counting ``scores <= threshold`` one tensor at a time. A concatenated copy plus ``kthvalue``
    (which clones its input and allocates an int64 index buffer) needs about four times the scores'
    memory; this needs one tensor's bool temporary.
    """
    # Keys between -inf and +inf only: the rest are NaN patterns, which compare false (scores
    # never hold NaN: the planner rejects them).
    lo, hi = _float_to_key(float("-inf"), dtype), _float_to_key(float("inf"), dtype)
    while lo < hi:
        mid = (lo + hi) // 2
        t = _bits_to_float(mid, dtype)
        count = sum(int((s.to(dtype) <= t.to(s.device)).sum()) for s in scores)
        if count >= k:
            hi = mid
        else:
            lo = mid + 1
    return _bits_to_float(lo, dtype)


def split_lowest_k(scores: Sequence[Tensor], k: int) -> list[int]:
    """How many of the ``k`` globally lowest scores fall in each tensor.

    Ties go to earlier tensors, then lower indices, so ``lowest_k(scores[i], counts[i])`` for each
    i selects exactly the global lowest k of the concatenation under a stable sort.
    """
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    if k <= 0:
        return [0] * len(scores)
    if k >= total:
        return sizes
    dtype = torch.float32
    for s in scores:
        dtype = torch.promote_types(dtype, s.dtype)
    t = kth_smallest(scores, k, dtype)
    # Compare in the promoted dtype: a 0-dim threshold would otherwise be rounded to each tensor's.
    less = [int((s.to(dtype) < t.to(s.device)).sum()) for s in scores]
    need = k - sum(less)
    counts = []
    for s, below in zip(scores, less):
        take = min(need, int((s.to(dtype) == t.to(s.device)).sum())) if need > 0 else 0
        need -= take
        counts.append(below + take)
    return counts
