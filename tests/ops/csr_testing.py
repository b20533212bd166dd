"""Helpers shared by the kernel and op tests."""
import torch


def reference(w, x, bias=None):
    """x W^T (+ bias) in float64."""
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def assert_close(out, ref):
    """Within float32 rounding of a float64 reference, relative to its largest entry."""
    scale = ref.abs().max().clamp_min(1.0)
    err = (out.double() - ref).abs().max() / scale
    assert err < 1e-5, f"max error {err:.2e} relative to {scale:.2e}"


def assert_nonfinite_like_dense(got, want):
    """``got`` (a kernel's float32 output) has NaN and Inf exactly where the float64 dense ``want``
    has them, and is close to it everywhere else."""
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got.double()[finite], want[finite], atol=1e-5)


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
