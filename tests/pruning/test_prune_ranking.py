"""kth_smallest across tensors equals kthvalue of their concatenation, special values included."""
import random

import pytest
import torch

from sparsenet.pruning.ranking import kth_smallest, split_lowest_k

SPECIAL = [0.0, -0.0, float("-inf"), float("inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, 1.0]


@pytest.mark.parametrize("seed", range(40))
def test_kth_smallest_matches_concatenated_kthvalue(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 30)
        kind = rng.randint(0, 3)
        if kind == 0:
            parts.append(torch.randn(n, generator=g))
        elif kind == 1:
            parts.append(torch.randint(-3, 3, (n,), generator=g).float())  # heavy ties
        elif kind == 2:
            parts.append(torch.tensor([rng.choice(SPECIAL) for _ in range(n)]))
        else:
            parts.append(torch.randn(n, generator=g, dtype=torch.float64))
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    flat = torch.cat([p.to(dtype) for p in parts])
    for k in range(1, flat.numel() + 1):
        assert kth_smallest(parts, k, dtype) == flat.kthvalue(k).values


def test_split_counts_equal_a_stable_sort():
    parts = [torch.tensor([3.0, 1.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])]
    order = torch.sort(torch.cat(parts), stable=True).indices
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    for k in range(8):
        expected = torch.bincount(owner[order[:k]], minlength=3).tolist()
        assert split_lowest_k(parts, k) == expected
