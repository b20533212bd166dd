"""Helpers shared by the kernel and op tests."""
import torch


def random_sparse(rows, cols, density, generator, empty_rows=()):
    """A float32 matrix with about `density` non-zeros (exactly 0 or all when density is 0 or 1)."""
    w = torch.randn(rows, cols, generator=generator)
    keep = torch.rand(rows, cols, generator=generator) < density
    if density >= 1.0:
        keep[:] = True
    w = w * keep
    for r in empty_rows:
        w[r] = 0
    return w


def pack(w):
    """The kernel's packed layout from a dense matrix, built with torch only (independent of formats/)."""
    csr = w.to_sparse_csr()
    crow = csr.crow_indices().to(torch.int64).contiguous()
    col = csr.col_indices().to(torch.int32)
    if w.shape[1] <= 65536:
        col = col.to(torch.uint16)
    return crow, col.contiguous(), csr.values().to(torch.float32).contiguous()
