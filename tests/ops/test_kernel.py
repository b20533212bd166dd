"""Native CSR x dense kernels against a float64 dense reference, on every ISA this CPU runs."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

import sparsenet
from sparsenet import _C

from csr_testing import assert_close, assert_nonfinite_like_dense, pack, random_sparse, reference

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

DENSITIES = [0.0, 0.01, 0.5, 0.9, 0.99, 1.0]
BATCHES = [1, 2, 3, 4, 5, 8, 17, 31, 32, 33, 64, 100, 300]


def run_kernel(w, x, bias=None):
    crow, col, values = pack(w)
    handle = _C.CsrHandle(w.shape[0], w.shape[1], crow.numpy(), col.numpy(), values.numpy())
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))
    handle.matmul(values.numpy(), x.numpy(), out.numpy(), None if bias is None else bias.numpy())
    return out


@pytest.mark.parametrize("density", DENSITIES)
def test_densities_and_batches(isa, threads, density):
    g = torch.Generator().manual_seed(int(density * 1000))
    w = random_sparse(45, 77, density, g, empty_rows=(0, 13))
    bias = torch.randn(45, generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, 77, generator=g)
        assert_close(run_kernel(w, x, bias), reference(w, x, bias))
        assert_close(run_kernel(w, x), reference(w, x))


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (7, 9), (129, 257), (64, 4096)])
def test_odd_shapes(isa, threads, shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = random_sparse(*shape, 0.3, g)
    for batch in (1, 3, 9, 40):
        x = torch.randn(batch, shape[1], generator=g)
        assert_close(run_kernel(w, x), reference(w, x))


def test_long_rows_and_heavy_imbalance(isa, threads):
    # One dense row among empty ones: balancing by non-zeros must not drop or repeat rows.
    g = torch.Generator().manual_seed(3)
    w = torch.zeros(200, 1000)
    w[17] = torch.randn(1000, generator=g)
    w[150, ::3] = 1.0
    for batch in (1, 6, 70):
        x = torch.randn(batch, 1000, generator=g)
        assert_close(run_kernel(w, x), reference(w, x))


@pytest.mark.parametrize("density", [0.12, 0.4])
@pytest.mark.parametrize("shape", [(200, 1000), (64, 256), (65, 257), (3, 65537)])
def test_large_batch_tiles_and_chunks(isa, threads, shape, density):
    # Weights at least 17% dense (7.5% on AVX2) are read, from batch 4, through a copy cut into
    # 64-row chunks and 256-column tiles, and from batch 17 those at least 7.5% (4.5%) dense (8-wide
    # AVX2 panels; AVX-512 ones from batch 16, up to 64 wide at most 30% dense, 32 above): rows and
    # columns on both sides of those edges, an empty tile, an empty and a full row, 32-bit indices,
    # panels of every width and several per pass.
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    w = random_sparse(*shape, density, g, empty_rows=(0,))
    if shape[1] >= 512:
        w[:, 256:512] = 0
    w[-1] = torch.randn(shape[1], generator=g)
    bias = torch.randn(shape[0], generator=g)
    # The 32-bit-index shape is the slow one: the panel widths' edges are covered by the others.
    batches = (4, 17, 65) if shape[1] > 65536 else (4, 5, 8, 15, 16, 17, 24, 32, 33, 48, 49, 64, 65, 100, 300)
    for batch in batches:
        x = torch.randn(batch, shape[1], generator=g)
        assert_close(run_kernel(w, x, bias), reference(w, x, bias))


def test_tiled_passes_of_eight_panels(isa, threads):
    # A weight past a quarter of the last-level cache is read once per 8 panels instead of 4
    # (planner.h): a cache of 3 bytes sends every weight there; 300 rows are a pass of 8 panels and
    # one of the last 2 (a part-filled panel among them), 40 rows one of 2.
    g = torch.Generator().manual_seed(8)
    w = random_sparse(200, 1000, 0.4, g, empty_rows=(3,))
    bias = torch.randn(200, generator=g)
    before = _C.set_last_level_cache_bytes(3)
    try:
        for batch in (40, 300):
            x = torch.randn(batch, 1000, generator=g)
            assert_close(run_kernel(w, x, bias), reference(w, x, bias))
    finally:
        _C.set_last_level_cache_bytes(before)


def test_tiled_rows_padded_with_zero_weights(isa, threads):
    # On AVX2 the column-tiled copy pads each row's share of a 256-column tile with zero weights to a
    # multiple of 8 (planner.h: weights at least 15% dense with at least 4,096 row shares; 2050 rows
    # x 2 tiles here) and takes a block's rows longest first. Shares of every length mod 8, empty
    # rows, a last chunk of 2 rows, and a last tile of 4 columns that some rows fill, leaving no
    # column for padding. The zeros sit at a column the row does not hold, so an Inf in x gives the
    # row NaN only where dense would: x's Inf at column 255 (the last column of a row's share), 0 (a
    # share's first) and 258 (the short tile), a NaN at 100.
    g = torch.Generator().manual_seed(12)
    w = random_sparse(2050, 260, 0.3, g, empty_rows=(0, 77, 2049))
    w[1:40, 256:] = torch.randn(39, 4, generator=g)
    bias = torch.randn(2050, generator=g)
    crow, col, values = pack(w)
    handle = _C.CsrHandle(2050, 260, crow.numpy(), col.numpy(), values.numpy())
    shares = torch.stack([(w[:, :256] != 0).sum(1), (w[:, 256:] != 0).sum(1)], 1)
    widths = torch.tensor([256, 4])
    padded = int(torch.where(shares < widths, (shares + 7) // 8 * 8, shares).sum())
    assert padded > values.numel()
    for batch in (8, 40):
        x = torch.randn(batch, 260, generator=g)
        out = torch.empty(batch, 2050)
        handle.matmul(values.numpy(), x.numpy(), out.numpy(), bias.numpy())
        assert_close(out, reference(w, x, bias))
        if isa == "fallback":
            assert handle.tiled_layout() is None  # (no tiled copy)
        else:
            assert handle.tiled_layout() == ((8, True, padded) if isa == "avx2" else (1, False, values.numel()))
        for row, column, value in ((1, 255, math.inf), (2, 0, -math.inf), (3, 258, math.inf), (4, 100, math.nan)):
            x[row, column] = value
        handle.matmul(values.numpy(), x.numpy(), out.numpy(), bias.numpy())
        assert_nonfinite_like_dense(out, reference(w, x, bias))


def test_tiled_copy_follows_the_isa_switched_between_calls():
    # The column-tiled copy is laid out per kernel family (AVX2 pads rows and sorts them; AVX-512
    # does neither; the fallback reads none). One handle called under each family in turn, twice over,
    # must rebuild it for the family that runs, never read one laid out for another.
    g = torch.Generator().manual_seed(13)
    w = random_sparse(2050, 260, 0.3, g, empty_rows=(5,))
    crow, col, values = pack(w)
    handle = _C.CsrHandle(2050, 260, crow.numpy(), col.numpy(), values.numpy())
    before = sparsenet.get_isa()
    try:
        for isa in sparsenet.available_isas() * 2:
            sparsenet.set_isa(isa)
            for batch in (8, 40):
                x = torch.randn(batch, 260, generator=g)
                out = torch.empty(batch, 2050)
                handle.matmul(values.numpy(), x.numpy(), out.numpy(), None)
                assert_close(out, reference(w, x))
            if isa != "fallback":  # (the fallback reads no copy; one built before may stay cached)
                assert handle.tiled_layout()[:2] == ((8, True) if isa == "avx2" else (1, False))
    finally:
        sparsenet.set_isa(before)


@pytest.mark.parametrize("cols", [65536, 65537])
def test_index_width(isa, cols):
    # 16-bit column indices up to 65536 columns, 32-bit beyond; the largest index must be reachable.
    g = torch.Generator().manual_seed(cols)
    w = torch.zeros(3, cols)
    w[0, cols - 1] = 2.0
    w[1, 0] = -1.0
    w[2, torch.randint(0, cols, (50,), generator=g)] = 0.5
    crow, col, values = pack(w)
    assert col.dtype == (torch.uint16 if cols <= 65536 else torch.int32)
    for batch in (1, 5):
        x = torch.randn(batch, cols, generator=g)
        assert_close(run_kernel(w, x), reference(w, x))


def test_strided_rows_of_x(isa):
    # x rows may be farther apart than the feature count (a column slice of a wider tensor).
    g = torch.Generator().manual_seed(5)
    w = random_sparse(20, 30, 0.4, g)
    wide = torch.randn(9, 50, generator=g)
    x = wide[:, 10:40]
    crow, col, values = pack(w)
    handle = _C.CsrHandle(20, 30, crow.numpy(), col.numpy(), values.numpy())
    out = torch.empty(9, 20)
    handle.matmul(values.numpy(), x.numpy(), out.numpy(), None)
    assert_close(out, reference(w, x))


def test_threads_agree_bitwise_per_row():
    # Each output element is computed by exactly one thread, so results do not depend on threads.
    g = torch.Generator().manual_seed(9)
    w = random_sparse(500, 600, 0.2, g)
    x = torch.randn(40, 600, generator=g)
    outs = []
    for n in (1, 2):
        _C.set_num_threads(n)
        outs.append(run_kernel(w, x))
    assert torch.equal(outs[0], outs[1])


# ---- the binding never trusts what it is handed ------------------------------------------------


def good_parts():
    crow = np.array([0, 2, 2, 3], dtype=np.int64)
    col = np.array([0, 4, 1], dtype=np.uint16)
    values = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    return crow, col, values


def test_valid_handle_properties():
    h = _C.CsrHandle(3, 5, *good_parts())
    assert (h.rows, h.cols, h.nnz, h.index_bytes) == (3, 5, 3, 2)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda c, i, v: (c[:-1], i, v), ValueError, "rows \\+ 1"),
        (lambda c, i, v: (np.array([1, 2, 2, 3], np.int64), i, v), ValueError, "crow_indices\\[0\\]"),
        (lambda c, i, v: (np.array([0, 2, 1, 3], np.int64), i, v), ValueError, "non-decreasing"),
        (lambda c, i, v: (np.array([0, 2, 2, 2], np.int64), i, v), ValueError, "does not match nnz"),
        (lambda c, i, v: (c, np.array([0, 5, 1], np.uint16), v), ValueError, "out of range"),
        (lambda c, i, v: (c, np.array([4, 0, 1], np.uint16), v), ValueError, "strictly increasing"),
        (lambda c, i, v: (c, np.array([0, 0, 1], np.uint16), v), ValueError, "strictly increasing"),
        (lambda c, i, v: (c, i, v[:2]), ValueError, "differ in length"),
        (lambda c, i, v: (c, i.astype(np.int64), v), TypeError, "uint16 or int32"),
        (lambda c, i, v: (c, i, v.astype(np.float64)), TypeError, "float32"),
        (lambda c, i, v: (c.astype(np.int32), i, v), TypeError, "int64"),
        (lambda c, i, v: (c, np.array([0, 4, 1, 9], np.uint16)[[0, 1, 2]], v.reshape(3, 1)), ValueError, "1-D"),
        (lambda c, i, v: (c, np.array([0, 9, 4, 9, 1], np.uint16)[::2], v), ValueError, "contiguous"),
        (lambda c, i, v: (c, np.array([0, -3, 1], np.int32), v), ValueError, "out of range"),
    ],
)
def test_malformed_csr_raises(mutate, error, match):
    with pytest.raises(error, match=match):
        _C.CsrHandle(3, 5, *mutate(*good_parts()))


def test_negative_or_oversized_dimensions_raise():
    crow, col, values = good_parts()
    with pytest.raises(ValueError):
        _C.CsrHandle(-1, 5, crow, col, values)
    with pytest.raises(ValueError, match="uint16"):
        _C.CsrHandle(3, 70000, crow, col, values)


def test_matmul_checks_its_arguments():
    parts = good_parts()
    h = _C.CsrHandle(3, 5, *parts)
    mm = lambda *args: h.matmul(parts[2], *args)  # noqa: E731
    x = np.ones((2, 5), np.float32)
    out = np.empty((2, 3), np.float32)
    with pytest.raises(ValueError, match="features"):
        mm(np.ones((2, 4), np.float32), out)
    with pytest.raises(TypeError, match="float32"):
        mm(x.astype(np.float64), out)
    with pytest.raises(ValueError, match="shape"):
        mm(x, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        mm(np.ones(5, np.float32), out)
    with pytest.raises(ValueError, match="bias"):
        mm(x, out, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="overlap"):
        buf = np.zeros(10, np.float32)
        mm(buf.reshape(2, 5), buf[:6].reshape(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        mm(x, np.empty((2, 6), np.float32)[:, :3])
    with pytest.raises(ValueError, match="unit stride"):
        mm(np.ones((2, 10), np.float32)[:, ::2], out)
    mm(x, out, np.zeros(3, np.float32))
    assert np.allclose(out, [[3.0, 0.0, 3.0]] * 2)




def test_handle_reads_its_own_copy_of_the_structure():
    # The structure is copied, then validated: writing out-of-range indices or row pointers into
    # the buffers it came from afterwards can neither crash a kernel nor change its result.
    crow, col, values = good_parts()
    h = _C.CsrHandle(3, 5, crow, col, values)
    keep = _C.CsrHandle(3, 5, crow, col, values, keep=True)
    x, out = np.ones((1, 5), np.float32), np.empty((1, 3), np.float32)
    crow[1:] = 2**40
    col[:] = 60000
    h.matmul(values, x, out)
    assert np.allclose(out, [[3.0, 0.0, 3.0]])
    assert torch.equal(owning_forward(keep, torch.ones(1, 5)), torch.tensor([[3.0, 0.0, 3.0]]))
    # The values are handed over on each call: any float32 buffer of the right length.
    h.matmul(values * 2, x, out)
    assert np.allclose(out, [[6.0, 0.0, 6.0]])
    with pytest.raises(ValueError, match="3 entries|structure holds 3"):
        h.matmul(values[:2], x, out)
    with pytest.raises(TypeError, match="float32"):
        h.matmul(values.astype(np.float64), x, out)


def owning_forward(h, x: torch.Tensor) -> torch.Tensor:
    return from_dlpack(h.forward(to_dlpack(x)))


@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_owning_forward_matches_matmul(isa, batch):
    w = random_sparse(37, 29, 0.3, torch.Generator().manual_seed(batch))
    x = torch.randn(batch, 29)
    bias = torch.randn(37)
    crow, col, values = pack(w)
    h = _C.CsrHandle(37, 29, crow.numpy(), col.numpy(), values.numpy(), keep=True, bias=bias.numpy())
    assert h.keeps_buffers
    out = owning_forward(h, x)
    assert out.shape == (batch, 37) and out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, reference(w, x, bias))
    no_bias = _C.CsrHandle(37, 29, crow.numpy(), col.numpy(), values.numpy(), keep=True)
    assert_close(owning_forward(no_bias, x), reference(w, x))


def test_owning_handle_keeps_its_buffers_alive():
    import gc

    w = random_sparse(50, 40, 0.5, torch.Generator().manual_seed(3))
    bias = torch.randn(50)
    crow, col, values = (t.numpy().copy() for t in pack(w))
    h = _C.CsrHandle(50, 40, crow, col, values, keep=True, bias=bias.numpy().copy())
    del crow, col, values
    gc.collect()
    junk = [np.full(100, 7, np.int64) for _ in range(1000)]  # reuse any freed memory
    x = torch.randn(2, 40)
    assert_close(owning_forward(h, x), reference(w, x, bias))
    del junk


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("consume", [False, True])
def test_forward_output_memory_is_freed(consume):
    # The result belongs to its capsule until torch takes it over (then to the tensor): 40 calls of
    # 12 MiB each would leave ~480 MiB behind if either owner forgot to free it. An empty weight
    # with a bias makes each 1000 x 3000 output cheap to compute (one thread: steady under load).
    rows = 3000
    empty = (np.zeros(rows + 1, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.float32))
    bias = np.arange(rows, dtype=np.float32)
    h = _C.CsrHandle(rows, 5, *empty, keep=True, bias=bias)
    x = to_dlpack(torch.ones(1000, 5))
    before_threads = sparsenet.get_num_threads()
    sparsenet.set_num_threads(1)
    try:
        first = from_dlpack(h.forward(x))
        assert torch.equal(first[-1], torch.from_numpy(bias))
        del first
        before = _rss_mib()
        for _ in range(40):
            capsule = h.forward(x)
            if consume:
                y = from_dlpack(capsule)
                del y
            del capsule
        assert _rss_mib() - before < 100
    finally:
        sparsenet.set_num_threads(before_threads)


def test_forward_checks_its_arguments_and_ownership():
    h = _C.CsrHandle(3, 5, *good_parts(), keep=True)
    fwd = lambda t: owning_forward(h, t)  # noqa: E731
    with pytest.raises(ValueError, match="features"):
        fwd(torch.ones(2, 4))
    with pytest.raises(TypeError, match="float32"):
        fwd(torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        fwd(torch.ones(5))
    with pytest.raises(ValueError, match="unit stride"):
        fwd(torch.ones(2, 10)[:, ::2])
    with pytest.raises(ValueError, match="overlap"):
        fwd(torch.ones(6).as_strided((2, 5), (1, 1)))
    with pytest.raises(TypeError, match="DLPack capsule"):
        h.forward(np.ones((2, 5), np.float32))
    used = to_dlpack(torch.ones(2, 5))
    from_dlpack(used)
    with pytest.raises(TypeError, match="unconsumed"):
        h.forward(used)
    with pytest.raises(ValueError, match="bias"):
        _C.CsrHandle(3, 5, *good_parts(), keep=True, bias=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="keep=True"):
        _C.CsrHandle(3, 5, *good_parts(), bias=np.ones(3, np.float32))
    assert torch.equal(fwd(torch.ones(2, 10)[:, :5]), torch.tensor([[3.0, 0.0, 3.0]] * 2))  # row stride
    assert fwd(torch.ones(0, 5)).shape == (0, 3)
    assert fwd(torch.ones(1, 5).t().t()).shape == (1, 3)
    non_owning = _C.CsrHandle(3, 5, *good_parts())
    assert not non_owning.keeps_buffers
    with pytest.raises(ValueError, match="keep"):
        non_owning.forward(to_dlpack(torch.ones(1, 5)))


def test_isa_selection_errors():
    with pytest.raises(ValueError, match="not compiled"):
        _C.set_isa("sse9")
