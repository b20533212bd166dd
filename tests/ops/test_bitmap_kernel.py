"""Native bitmap x dense kernels against a float64 dense reference, on every ISA this CPU runs, and
the handle's validation of what it is handed."""
import numpy as np
import pytest
import torch

from sparsenet import _C
from sparsenet.formats.bitmap import PackedBitmap

from csr_testing import assert_close, assert_nonfinite_like_dense, reference

DENSITIES = [0.0, 0.05, 0.5, 0.9, 1.0]
# row pairs up to 8 (AVX-512) or 4 (AVX2), then panels (AVX-512) or CSR's kernels over the structure
# derived from the bitmap (AVX2)
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33]
COLS = [1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100]


def handle(b):
    return _C.BitmapHandle(b.shape[0], b.shape[1], b.masks.numpy(), b.row_ptr.numpy(), b.values.numpy())


def run(w, x, bias=None):
    b = PackedBitmap.from_dense(w)
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))
    handle(b).matmul(b.values.numpy(), x.numpy(), out.numpy(), None if bias is None else bias.numpy())
    return out


def weights(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("cols", COLS)
def test_every_width_and_density(isa, one_thread, density, cols):
    w = weights(13, cols, density, cols)
    for batch in BATCHES:
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        bias = torch.randn(13)
        assert_close(run(w, x, bias), reference(w, x, bias))


def test_empty_rows_strided_input_and_batch_zero(isa):
    w = weights(40, 70, 0.5, 1)
    w[::3] = 0  # empty rows
    w[:, 16:32] = 0  # an empty chunk in every row
    base = torch.randn(19, 90)
    for batch in (1, 3, 4, 5, 8, 19):  # row pairs (AVX2 to 4, AVX-512 to 8), rows, panels
        x = base[:batch, 5:75]  # rows 90 apart: a strided input the kernel reads in place
        assert_close(run(w, x), reference(w, x))
    out = torch.empty(0, 40)
    b = PackedBitmap.from_dense(w)
    handle(b).matmul(b.values.numpy(), torch.empty(0, 70).numpy(), out.numpy())


# 1 and 4: row pairs, 64 columns a step, then the rest; 5 (AVX2) and 12: CSR's kernels over the
# structure derived from the bitmap (AVX2), or row pairs and then panels (AVX-512)
@pytest.mark.parametrize("batch", [1, 4, 5, 12])
def test_large_and_threaded(isa, two_threads, batch):
    w = weights(301, 1000, 0.3, 2)
    x = torch.randn(batch, 1000)
    assert_close(run(w, x), reference(w, x))


@pytest.mark.parametrize("batch", [6, 9])  # the row kernels, then the panels (from batch 9 or 8)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_inputs_follow_dense_semantics(isa, bad, batch):
    w = weights(6, 40, 0.4, 3)
    w[2] = 0  # a row storing nothing
    x = torch.randn(batch, 40)
    x[1, 5] = bad  # a column some rows store and others do not
    x[2, 39] = bad  # in the last, partial chunk
    x[4, 17] = bad
    got = run(w, x)
    want = torch.nn.functional.linear(x.double(), w.double())
    assert_nonfinite_like_dense(got, want)


def test_handle_validates_and_keeps_its_own_copy():
    w = weights(5, 20, 0.5, 4)
    b = PackedBitmap.from_dense(w)
    masks = b.masks.clone()
    bad = masks.to(torch.int32)
    bad[0] ^= 1
    with pytest.raises(ValueError, match="row 0 stores"):
        _C.BitmapHandle(5, 20, bad.to(torch.uint16).numpy(), b.row_ptr.numpy(), b.values.numpy())
    past = masks.to(torch.int32)
    past[1] |= 1 << 8
    with pytest.raises(ValueError, match="past the last column"):
        _C.BitmapHandle(5, 20, past.to(torch.uint16).numpy(), b.row_ptr.numpy(), b.values.numpy())
    with pytest.raises(ValueError, match="does not match nnz"):
        _C.BitmapHandle(5, 20, masks.numpy(), b.row_ptr.numpy(), b.values[:-1].numpy())
    with pytest.raises(ValueError, match="masks has"):
        _C.BitmapHandle(5, 20, masks[:-1].numpy(), b.row_ptr.numpy(), b.values.numpy())
    with pytest.raises(TypeError, match="masks must be uint16"):
        _C.BitmapHandle(5, 20, masks.to(torch.int32).numpy(), b.row_ptr.numpy(), b.values.numpy())
    h = _C.BitmapHandle(5, 20, masks.numpy(), b.row_ptr.numpy(), b.values.numpy())
    masks.fill_(0xFFFF)  # written after the handle copied and checked it: no effect
    x = torch.randn(2, 20)
    out = torch.empty(2, 5)
    h.matmul(b.values.numpy(), x.numpy(), out.numpy())
    assert_close(out, reference(w, x))
    with pytest.raises(ValueError, match="values has"):
        h.matmul(b.values[:-1].numpy(), x.numpy(), out.numpy())
    with pytest.raises(ValueError, match="features"):
        h.matmul(b.values.numpy(), torch.randn(2, 21).numpy(), out.numpy())
    with pytest.raises(ValueError, match="out must have shape"):
        h.matmul(b.values.numpy(), x.numpy(), torch.empty(3, 5).numpy())
    assert np.array_equal(h.structure()[0], b.masks.numpy()) and not h.structure()[0].flags.writeable
