"""sparsenet.ops' handle cache: a cached handle stands for exactly the tensors it was built from."""
import pytest
import torch

import sparsenet
from sparsenet.ops import csr_handle, csr_linear

from csr_testing import pack, random_sparse


def test_strided_view_starting_where_a_cached_tensor_starts_is_refused():
    # base[:n] and base[::2] start at the same address with the same length: a cache keyed by
    # address and size handed the first one's handle to the second instead of refusing it.
    w = random_sparse(6, 9, 0.5, torch.Generator().manual_seed(0))
    crow, col, values = (t.clone() for t in pack(w))  # pack's share one version counter
    nnz = values.numel()
    col_base = torch.cat([col, col]).contiguous()
    values_base = torch.cat([values, values * 3])
    x = torch.randn(2, 9)
    col_first, values_first = col_base[:nnz], values_base[:nnz]  # kept alive: their handle stays cached
    y = csr_linear(x, crow, col_first, values_first, None, 9)
    torch.testing.assert_close(y, x @ w.T)
    strided = (col_base[: 2 * nnz : 2], values_base[: 2 * nnz : 2])
    for col_view, values_view in (strided, (col_first, strided[1]), (strided[0], values_first)):
        with pytest.raises(ValueError, match="must be contiguous"):
            csr_linear(x, crow, col_view, values_view, None, 9)
        with pytest.raises(ValueError, match="must be contiguous"):
            csr_handle(crow, col_view, values_view, 9)


def test_value_edit_builds_a_new_handle():
    w = random_sparse(30, 40, 0.5, torch.Generator().manual_seed(1))
    crow, col, values = (t.clone() for t in pack(w))  # pack's share one version counter
    x = torch.randn(20, 40)
    torch.testing.assert_close(csr_linear(x, crow, col, values, None, 40), x @ w.T)  # tiled copy built
    first = csr_handle(crow, col, values, 40)
    assert csr_handle(crow, col, values, 40) is first
    values.mul_(2)  # the tiled copy holds the values: the handle that made it must not be reused
    assert csr_handle(crow, col, values, 40) is not first
    torch.testing.assert_close(csr_linear(x, crow, col, values, None, 40), x @ (2 * w).T)


def test_inference_values_are_never_cached():
    w = random_sparse(30, 40, 0.5, torch.Generator().manual_seed(2))
    crow, col, values = (t.clone() for t in pack(w))  # pack's share one version counter
    with torch.inference_mode():
        values = values.clone()
    x = torch.randn(20, 40)
    sparsenet.ops.csr_linear(x, crow, col, values, None, 40)
    with torch.inference_mode():
        values.mul_(-1)  # no version counter records this
    torch.testing.assert_close(csr_linear(x, crow, col, values, None, 40), -(x @ w.T))
