"""Native BSR x dense kernels against a float64 dense reference, on every ISA this CPU runs, and the
handle's validation of what it is handed."""
import numpy as np
import pytest
import torch

from sparsenet import _C
from sparsenet.formats.bsr import PackedBSR

from csr_testing import assert_close, assert_nonfinite_like_dense, reference

# Every kernel path: blocks 1 wide (vectorised along rows), narrower and wider than a vector, square
# 4 / 8 / 16, rows of more than 16 (the 16-row panel group plus a remainder), 9-15 rows (one register
# tile of that many rows on AVX-512; 6-row tiles and a rest on AVX2), the largest allowed.
BLOCKS = [(1, 1), (1, 3), (1, 16), (16, 1), (7, 1), (64, 1), (2, 8), (4, 4), (3, 5), (8, 8), (16, 16), (16, 4),
          (9, 2), (12, 4), (20, 12), (32, 32), (5, 64)]
SHAPES = [(1, 1), (37, 45), (64, 128), (100, 9)]  # edges the blocks do not divide, and ones they do
BATCHES = [1, 2, 3, 4, 5, 16, 17, 33, 70]


def weights(rows, cols, block, density, seed):
    """Kept in whole blocks (partial at the edges), random values: zeros inside stored blocks too."""
    g = torch.Generator().manual_seed(seed)
    r, c = block
    keep = torch.rand(-(-rows // r), -(-cols // c), generator=g) < density
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return torch.randn(rows, cols, generator=g) * keep * (torch.rand(rows, cols, generator=g) < 0.9)


def handle(p):
    return _C.BsrHandle(p.shape[0], p.shape[1], *(t.numpy() for t in (p.block_shape, p.block_ptr, p.block_cols,
                                                                      p.values)))


def run(p, x, bias=None):
    out = torch.full((x.shape[0], p.shape[0]), float("nan"))
    handle(p).matmul(p.values.numpy(), x.numpy(), out.numpy(), None if bias is None else bias.numpy())
    return out


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_every_block_shape_edge_and_batch(isa, one_thread, block):
    for i, (rows, cols) in enumerate(SHAPES):
        for density in (0.0, 0.4, 1.0):
            w = weights(rows, cols, block, density, i)
            p = PackedBSR.from_dense(w, block=block)
            bias = torch.randn(rows)
            for batch in BATCHES:
                x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
                assert_close(run(p, x, bias), reference(w, x, bias))


def test_strided_input_empty_block_rows_and_batch_zero(isa):
    w = weights(48, 70, (8, 8), 0.5, 1)
    w[8:24] = 0  # two empty block rows
    p = PackedBSR.from_dense(w, block=(8, 8))
    base = torch.randn(19, 90)
    x = base[:, 5:75]  # rows 90 apart: read in place
    assert_close(run(p, x), reference(w, x))
    out = torch.empty(0, 48)
    handle(p).matmul(p.values.numpy(), torch.empty(0, 70).numpy(), out.numpy())


@pytest.mark.parametrize("batch", [1, 64, 200])  # row-shared panels, and whole panels per thread
def test_large_and_threaded(isa, batch, two_threads):
    w = weights(300, 1000, (16, 16), 0.3, 2)
    p = PackedBSR.from_dense(w, block=(16, 16))
    x = torch.randn(batch, 1000)
    assert_close(run(p, x), reference(w, x))


@pytest.mark.parametrize("batch", [3, 70])
def test_weights_too_big_for_the_cache_pass_in_bigger_groups(isa, batch, two_threads):
    # Past 8 MB of values AVX2's direct tiles group more samples per pass over the weights.
    w = weights(2048, 1100, (16, 16), 0.6, 7)  # ~1.35M stored values of 16x16 blocks: ~5.4M bytes...
    w = torch.cat([w, w.flip(0)], dim=1)  # ...twice: past 8 MB
    p = PackedBSR.from_dense(w, block=(16, 16))
    assert p.values.numel() * 4 > 8 * 1024 * 1024
    x = torch.randn(batch, w.shape[1])
    assert_close(run(p, x), reference(w, x))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("block, batch", [((4, 8), 6), ((16, 16), 20), ((16, 16), 5)])  # panels; AVX2's direct tiles
def test_non_finite_inputs_follow_dense_semantics(isa, bad, block, batch):
    w = weights(36, 40, block, 0.5, 3)
    w[4:8] = 0  # a block row storing nothing (of 4 x 8 blocks)
    w[16:32] = 0  # (of 16 x 16 blocks)
    p = PackedBSR.from_dense(w, block=block)
    x = torch.randn(batch, 40)
    x[1, 5] = bad
    x[2, 39] = bad  # in the last, partial block column
    x[4, 17] = bad
    x[batch - 1, 20] = bad  # in the last, partial tile of samples
    got = run(p, x)
    want = torch.nn.functional.linear(x.double(), p.to_dense().double())
    assert_nonfinite_like_dense(got, want)


@pytest.mark.parametrize("block", [(16, 16), (32, 8)], ids=["16x16", "32x8"])
@pytest.mark.parametrize("batch", [1, 33])
def test_copy_of_the_values_follows_the_values_handed_over(isa, block, batch):
    # AVX2 runs blocks 16k rows high on a block-transposed copy of the values, which the handle
    # keeps: values handed over in another buffer must be copied again, not answered from the old copy.
    w = weights(40, 56, block, 0.5, 5)
    p = PackedBSR.from_dense(w, block=block)
    h = handle(p)
    x = torch.randn(batch, 56)
    first, second = p.values.clone(), p.values * -3
    for values, scale in ((first, 1), (second, -3), (first, 1)):
        out = torch.empty(batch, 40)
        h.matmul(values.numpy(), x.numpy(), out.numpy())
        assert_close(out, reference(w * scale, x))


def test_handle_validates_and_keeps_its_own_copy():
    w = weights(20, 30, (4, 4), 0.5, 4)
    p = PackedBSR.from_dense(w, block=(4, 4))
    shape, ptr, cols, vals = (t.clone().numpy() for t in (p.block_shape, p.block_ptr, p.block_cols, p.values))

    def build(s=shape, bp=ptr, bc=cols, v=vals, rows=20, n_cols=30):
        return _C.BsrHandle(rows, n_cols, s, bp, bc, v)

    with pytest.raises(ValueError, match="block shape must be"):
        build(s=np.array([0, 4], dtype=np.int64))
    with pytest.raises(ValueError, match="block shape must be"):
        build(s=np.array([65, 1], dtype=np.int64))
    with pytest.raises(TypeError, match="block_shape"):
        build(s=np.array([4, 4, 1], dtype=np.int64))
    with pytest.raises(ValueError, match="block_ptr has"):
        build(bp=ptr[:-1])
    with pytest.raises(ValueError, match="values has"):
        build(v=vals[:-1])
    out_of_range = cols.copy()
    out_of_range[-1] = 8  # ceil(30 / 4) = 8 block columns: 0..7
    with pytest.raises(ValueError, match="outside"):
        build(bc=out_of_range)
    unsorted = cols.copy()
    first_row = slice(int(ptr[0]), int(ptr[1]))
    assert ptr[1] - ptr[0] >= 2, "the test needs a block row with two blocks"
    unsorted[first_row] = unsorted[first_row][::-1].copy()
    with pytest.raises(ValueError, match="strictly increasing"):
        build(bc=unsorted)
    too_many = ptr.copy()
    too_many[-1] += 1  # the last block row claims a block more than block_cols holds
    with pytest.raises(ValueError, match="exceeds"):
        build(bp=too_many)
    with pytest.raises(TypeError, match="block_cols must be int32"):
        build(bc=cols.astype(np.int64))
    h = build()
    cols[:] = 0  # written after the handle copied and checked it: no effect
    x = torch.randn(3, 30)
    out = torch.empty(3, 20)
    h.matmul(vals, x.numpy(), out.numpy())
    assert_close(out, reference(w, x))
    with pytest.raises(ValueError, match="values has"):
        h.matmul(vals[:-1], x.numpy(), out.numpy())
    with pytest.raises(ValueError, match="features"):
        h.matmul(vals, torch.randn(3, 31).numpy(), out.numpy())
    got_shape, got_ptr, got_cols = h.structure()
    assert list(got_shape) == [4, 4] and np.array_equal(got_cols, p.block_cols.numpy())
    assert not got_cols.flags.writeable
