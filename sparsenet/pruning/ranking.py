"""Exact lowest-k selection with deterministic ties, without sorting everything.

Both functions find the k-th smallest score with ``kthvalue`` (linear time), take everything
strictly below it, and hand the remaining quota to the tied elements in index order. The result
is exactly what a stable sort would remove, so counts are exact even when all scores are equal.
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
    device = scores[0].device
    # One concatenated copy is the price of an exact global k-th value; it is freed right away.
    flat = torch.cat([s.reshape(-1).to(device=device, dtype=dtype) for s in scores])
    t = flat.kthvalue(k).values
    del flat
    # Compare in the promoted dtype: a 0-dim threshold would otherwise be rounded to each tensor's.
    less = [int((s.to(dtype) < t.to(s.device)).sum()) for s in scores]
    need = k - sum(less)
    counts = []
    for s, below in zip(scores, less):
        take = min(need, int((s.to(dtype) == t.to(s.device)).sum())) if need > 0 else 0
        need -= take
        counts.append(below + take)
    return counts
