"""Native N:M x dense kernels against a float64 dense reference, on every ISA this CPU runs (their
own kernels below 4 inputs, CSR's batch kernels over the derived structure from there), and the
handle's validation of what it is handed."""
import numpy as np
import pytest
import torch

from sparsenet import _C
from sparsenet.formats.nm import PackedNM

from csr_testing import assert_close, assert_nonfinite_like_dense, reference

# Every M = 2N pattern (the vector paths, 2- and 4-bit indices), and others (slot by slot).
PATTERNS = [(1, 2), (2, 4), (4, 8), (8, 16), (1, 4), (3, 8), (5, 16)]
COLS = [16, 31, 32, 33, 64, 100, 130]  # shorter and longer than a vector step, partial last groups
BATCHES = [1, 2, 3, 4, 5, 17, 33]


def nm_weight(rows, cols, pattern, seed, fill=0.9):
    n, m = pattern
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(rows, -(-cols // m), m, generator=g).argsort(dim=-1)
    keep = (order < n).reshape(rows, -1)[:, :cols] & (torch.rand(rows, cols, generator=g) < fill)
    return torch.randn(rows, cols, generator=g) * keep


def handle(p):
    return _C.NmHandle(p.shape[0], p.shape[1], p.pattern.numpy(), p.indices.numpy(), p.values.numpy())


def run(p, x, bias=None):
    out = torch.full((x.shape[0], p.shape[0]), float("nan"))
    handle(p).matmul(p.values.numpy(), x.numpy(), out.numpy(), None if bias is None else bias.numpy())
    return out


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_every_pattern_width_and_batch(isa, one_thread, pattern):
    for cols in COLS:
        if 0 < cols % pattern[1] < pattern[0]:
            continue  # a last group too short for N (refused: see test_nm.py)
        for fill in (0.0, 0.9, 1.0):  # all padding, some, none
            w = nm_weight(13, cols, pattern, cols, fill)
            p = PackedNM.from_dense(w, pattern=pattern)
            bias = torch.randn(13)
            for batch in BATCHES:
                x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
                assert_close(run(p, x, bias), reference(w, x, bias))


def test_strided_input_and_batch_zero(isa):
    w = nm_weight(40, 64, (2, 4), 1)
    p = PackedNM.from_dense(w)
    base = torch.randn(19, 90)
    for x in (base[:, 5:69], base[:3, 5:69]):  # rows 90 apart, read in place (both regimes)
        assert_close(run(p, x), reference(w, x))
    out = torch.empty(0, 40)
    handle(p).matmul(p.values.numpy(), torch.empty(0, 64).numpy(), out.numpy())


@pytest.mark.parametrize("batch", [1, 64])
def test_large_and_threaded(isa, batch, two_threads):
    w = nm_weight(300, 1024, (2, 4), 2)
    p = PackedNM.from_dense(w)
    x = torch.randn(batch, 1024)
    assert_close(run(p, x), reference(w, x))


@pytest.mark.parametrize("batch", [3, 6])  # the N:M kernels, and CSR's over the derived structure
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_inputs_follow_dense_semantics(isa, bad, batch):
    w = nm_weight(12, 40, (2, 4), 3, fill=0.7)
    w[4] = 0  # a row storing nothing but padding
    p = PackedNM.from_dense(w, pattern=(2, 4))
    x = torch.randn(batch, 40)
    x[1, 5] = bad
    x[2, 39] = bad
    got = run(p, x)
    want = torch.nn.functional.linear(x.double(), w.double())
    assert_nonfinite_like_dense(got, want)


def test_handle_validates_and_keeps_its_own_copy():
    w = nm_weight(6, 20, (2, 4), 4)
    p = PackedNM.from_dense(w, pattern=(2, 4))
    pattern, indices, values = (t.clone().numpy() for t in (p.pattern, p.indices, p.values))

    def build(pa=pattern, ix=indices, v=values):
        return _C.NmHandle(6, 20, pa, ix, v)

    with pytest.raises(ValueError, match="pattern must be N:M"):
        build(pa=np.array([4, 4], dtype=np.int64))
    with pytest.raises(ValueError, match="pattern must be N:M"):
        build(pa=np.array([2, 32], dtype=np.int64))
    with pytest.raises(TypeError, match="pattern must be 2 int64"):
        build(pa=np.array([2, 4, 1], dtype=np.int64))
    with pytest.raises(ValueError, match="indices has"):
        build(ix=indices[:-1])
    with pytest.raises(ValueError, match="values has"):
        build(v=values[:-1])
    with pytest.raises(TypeError, match="indices must be uint8"):
        build(ix=indices.astype(np.int16))
    repeated = indices.copy()
    repeated[0] = 0  # slots 0-3 (two groups) all at column 0 of their group
    with pytest.raises(ValueError, match="strictly increasing"):
        build(ix=repeated)
    with pytest.raises(ValueError, match="fewer than n"):
        _C.NmHandle(6, 21, np.array([2, 4], dtype=np.int64), np.zeros(6 * 3, dtype=np.uint8),
                    np.zeros(6 * 12, dtype=np.float32))
    h = build()
    indices[:] = 0  # written after the handle copied and checked it: no effect
    for batch in (2, 5):
        x = torch.randn(batch, 20)
        out = torch.empty(batch, 6)
        h.matmul(values, x.numpy(), out.numpy())
        assert_close(out, reference(w, x))
    with pytest.raises(ValueError, match="values has"):
        h.matmul(values[:-1], x.numpy(), out.numpy())
    got_pattern, got_indices = h.structure()
    assert list(got_pattern) == [2, 4] and np.array_equal(got_indices, p.indices.numpy())
    assert not got_indices.flags.writeable
