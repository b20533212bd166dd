"""Inf and NaN in an input sample reach that sample's outputs exactly as in the dense layer.

A pruned weight is a zero, and 0 x Inf and 0 x NaN are NaN: so an output is NaN wherever its row
lacks a column that holds a non-finite input, and otherwise whatever the stored products give
(Inf, -Inf or NaN). Pinned on every ISA, batch regime and call path against a float64 dense layer.
"""
import pytest
import torch
from torch import nn

from sparsenet.nn import SparseLinear

from call_paths import PATHS

# Batch 1-3: one dot product per output (its 1-7 tail is one masked vector step that reads the
# next row's columns); 4-16: 8-wide panels (tiled from 17% density, 7.5% on AVX2); 17 on: wide panels.
BATCHES = [1, 2, 3, 4, 5, 16, 17, 33]


def layer_and_dense(out_f, in_f, density, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out_f, in_f, generator=g) < density)
        lin.weight[0] = torch.randn(in_f, generator=g)  # a fully dense row: no zero to meet an Inf
    return SparseLinear.from_dense(lin), lin


def inputs_with_nonfinite(batch, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_f, generator=g)
    specials = [float("nan"), float("inf"), float("-inf")]
    for m in range(0, batch, 2):  # every other sample keeps finite inputs: they must stay exact
        cols = torch.randperm(in_f, generator=g)[: 1 + m % 3]
        for i, c in enumerate(cols.tolist()):
            x[m, c] = specials[(m + i) % 3]
    return x


def assert_dense_semantics(out, lin, x):
    ref = torch.nn.functional.linear(x.double(), lin.weight.detach().double(), lin.bias.detach().double())
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs from the dense layer's"
    assert torch.equal(out.isinf(), ref.isinf()), "Inf pattern differs from the dense layer's"
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()].float()), "Inf signs differ"
    ok = ref.isfinite()
    if ok.any():
        err = (out.double()[ok] - ref[ok]).abs().max() / ref[ok].abs().max().clamp_min(1.0)
        assert err < 1e-5


@pytest.mark.parametrize("density", [0.03, 0.05, 0.3, 0.9])
@pytest.mark.parametrize("batch", BATCHES)
def test_every_isa_and_batch_regime(isa, batch, density):
    layer, lin = layer_and_dense(45, 61, density, seed=batch)
    x = inputs_with_nonfinite(batch, 61, seed=batch)
    assert_dense_semantics(PATHS["eager"](layer, x), lin, x)


@pytest.mark.parametrize("batch", [1, 4, 17])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_call_path(path, batch):
    layer, lin = layer_and_dense(45, 300, 0.3, seed=7)
    x = inputs_with_nonfinite(batch, 300, seed=batch)
    assert_dense_semantics(PATHS[path](layer, x), lin, x)


def test_inf_in_the_next_rows_column_does_not_leak_into_a_row(isa):
    # Row 0 holds 3 non-zeros (a masked tail step reads 5 more indices: row 1's), row 1 holds
    # column 5. A single input x = Inf at column 5 (and nothing else non-finite) must make row 0's
    # output NaN (dense: 0 x Inf), row 1's Inf, and row 2 (which stores every column) Inf too.
    w = torch.zeros(3, 8)
    w[0, :3] = 1.0
    w[1, 5] = 2.0
    w[2] = 1.0
    lin = nn.Linear(8, 3, bias=False)
    lin.weight.data = w
    layer = SparseLinear.from_dense(lin)
    x = torch.zeros(1, 8)
    x[0, 5] = float("inf")
    out = PATHS["eager"](layer, x)
    assert out[0, 0].isnan() and out[0, 1] == float("inf") and out[0, 2] == float("inf")
    finite = torch.zeros(1, 8)
    finite[0, 5] = 1e30
    assert torch.equal(PATHS["eager"](layer, finite), torch.tensor([[0.0, 2e30, 1e30]]))


def _pruned_for(fmt, out_f, in_f, g):
    """A weight whose kept entries fit `fmt`: 16x16 blocks for BSR, 2 of every 4 for N:M; "sparse csr":
    3% dense (below the column-tiled copy's densities, so CSR runs its row-range panels)."""
    w = torch.randn(out_f, in_f, generator=g)
    if fmt == "sparse csr":
        return w * (torch.rand(out_f, in_f, generator=g) < 0.03)
    if fmt == "bsr":
        keep = (torch.rand(out_f // 16, in_f // 16, generator=g) < 0.4).repeat_interleave(16, 0)
        return w * keep.repeat_interleave(16, 1)
    if fmt == "nm":
        order = torch.rand(out_f, in_f // 4, 4, generator=g).argsort(dim=-1)
        return w * (order < 2).reshape(out_f, in_f)
    return w * (torch.rand(out_f, in_f, generator=g) < 0.4)


# 160 samples x 1024 inputs, contiguous: past the size where the scan for non-finite inputs is split
# between threads (at sample 80). One value at each end of each thread's share must be found.
@pytest.mark.parametrize("at", [(0, 0), (79, 1023), (80, 0), (159, 1023)], ids=str)
@pytest.mark.parametrize("fmt", ["csr", "bitmap", "bsr", "nm"])
def test_a_large_batch_is_scanned_whole(two_threads, fmt, at):
    g = torch.Generator().manual_seed(11)
    lin = nn.Linear(1024, 48)
    with torch.no_grad():
        lin.weight.copy_(_pruned_for(fmt, 48, 1024, g))
    layer = SparseLinear.from_dense(lin, format=fmt)
    assert layer.format == fmt
    x = torch.randn(160, 1024, generator=g)
    x[at] = float("inf")
    assert_dense_semantics(layer(x), lin, x)
    assert layer(x)[at[0]].isnan().any()  # a pruned zero met the Inf


@pytest.mark.parametrize("fmt", ["csr", "bitmap", "bsr", "nm"])
def test_columns_outside_a_strided_input_are_not_scanned(two_threads, fmt):
    g = torch.Generator().manual_seed(12)
    lin = nn.Linear(1024, 48)
    with torch.no_grad():
        lin.weight.copy_(_pruned_for(fmt, 48, 1024, g))
    layer = SparseLinear.from_dense(lin, format=fmt)
    wide = torch.randn(160, 1040, generator=g)
    wide[:, 1024:] = float("nan")  # beside every row, never part of x
    x = wide[:, :1024]
    out = layer(x)
    assert out.isfinite().all()
    assert_dense_semantics(out, lin, x)
    x[100, 5] = float("nan")
    assert_dense_semantics(layer(x), lin, x)


# From batch 4-16 on, the kernels transpose x into panels and check each value for Inf and NaN as
# they copy it; when all are finite the scan after the multiply is skipped, so a value the check
# missed would go unseen. One Inf per call, at every column (the vector steps and the tails of the
# column ranges split unevenly between the packing threads alike: 1,008 columns), in panels of the
# batch's various widths, several panels per call, and thread-owned BSR panels (300 samples); CSR
# both on its column-tiled copy and, 3% dense, on its row-range panels.
@pytest.mark.parametrize("batch", [17, 40, 300])
@pytest.mark.parametrize("fmt", ["csr", "sparse csr", "bitmap", "bsr", "nm"])
def test_the_panel_kernels_check_every_input(isa, two_threads, fmt, batch):
    g = torch.Generator().manual_seed(batch)
    lin = nn.Linear(1008, 48)
    with torch.no_grad():
        lin.weight.copy_(_pruned_for(fmt, 48, 1008, g))
    layer = SparseLinear.from_dense(lin, format=fmt.split()[-1]).eval()
    w = lin.weight.detach()
    x = torch.randn(batch, 1008, generator=g)
    with torch.inference_mode():
        finite = layer(x)
        assert_dense_semantics(finite, lin, x)
        for column in range(0, 1008, 1 if batch == 17 else 11):
            m = column * 7 % batch
            kept = x[m, column].item()
            x[m, column] = float("inf")
            out = layer(x)
            x[m, column] = kept
            assert torch.equal(out[m].isnan(), w[:, column] == 0), f"Inf at ({m}, {column})"
            assert torch.equal(out[m].isinf(), w[:, column] != 0)
            others = torch.arange(batch) != m
            assert torch.equal(out[others], finite[others])
