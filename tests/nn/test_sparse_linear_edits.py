"""What SparseLinear sees of edits to its tensors, on every call path (tests/nn/call_paths.py).

Edits torch tracks (in-place ops, copy_, load_state_dict) are always seen, derived copies included;
writes that bypass the version counter (.data, .numpy(), DLPack) may be ignored but can never make a
kernel read or write out of bounds: the result is the old one, or a ValueError.
"""
import pytest
import torch
from torch import nn
from torch.utils.dlpack import from_dlpack, to_dlpack

from sparsenet.nn import SparseLinear

from call_paths import PATHS


def pruned(in_f, out_f, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out_f, in_f, generator=g) < density)
    return lin


def reference(lin, x):
    return x.double() @ lin.weight.detach().double().T + lin.bias.detach().double()


def assert_close(out, ref):
    err = (out.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)
    assert err < 1e-5, f"max error {err:.2e}"


# ---- tracked edits of the values: derived copies follow ------------------------------------------

EDITS = {
    "mul_": lambda layer, lin: (layer.values.mul_(-2), lin.weight.mul_(-2)),
    "copy_": lambda layer, lin: _copy_values(layer, lin, torch.randn(layer.nnz)),
    "load_state_dict": lambda layer, lin: _load_values(layer, lin, torch.randn(layer.nnz)),
}


def _copy_values(layer, lin, new):
    with torch.no_grad():
        layer.values.copy_(new)
        lin.weight[lin.weight != 0] = new


def _load_values(layer, lin, new):
    layer.load_state_dict({"values": new}, strict=False)
    with torch.no_grad():
        lin.weight[lin.weight != 0] = new


# Batch 4 uses the tiled copy from 17% density (7.5% on AVX2), batch 17 and more from 7.5% (4.5%).
CASES = [(4, 0.5), (17, 0.1), (40, 0.3)]
EAGER_PATHS = sorted(set(PATHS) - {"compiled"})


def check_value_edit(call, edit, batch, density):
    lin = pruned(300, 70, density, seed=batch)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(batch, 300)
    with torch.no_grad():
        assert_close(call(layer, x), reference(lin, x))  # builds the handle and its tiled copy
        EDITS[edit](layer, lin)
        assert_close(call(layer, x), reference(lin, x))
        assert_close(call(layer, x[:1]), reference(lin, x[:1]))  # and the row-by-row path agrees


@pytest.mark.parametrize("batch, density", CASES)
@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("path", EAGER_PATHS)
def test_tracked_value_edits_reach_every_derived_copy(isa, path, edit, batch, density):
    check_value_edit(PATHS[path], edit, batch, density)


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_tracked_value_edits_reach_a_compiled_module(isa, edit):
    check_value_edit(PATHS["compiled"], edit, *CASES[1])  # compiling costs seconds: one case


# ---- writes torch does not track: never out of bounds ----------------------------------------------

def _through_data(t, value):
    t.data[1:] = value


def _through_numpy(t, value):
    t.numpy()[1:] = value


def _through_dlpack(t, value):
    from_dlpack(to_dlpack(t))[1:] = value


WRITERS = {"data": _through_data, "numpy": _through_numpy, "dlpack": _through_dlpack}
# Out of range in every way the kernels index with them: row pointers past nnz (and far past any
# mapping), column indices past in_features.
CORRUPTIONS = {"crow_indices": 2**40, "col_indices": 60000}


@pytest.mark.parametrize("target", sorted(CORRUPTIONS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_untracked_structure_writes_never_reach_a_kernel(path, writer, target):
    lin = pruned(300, 70, 0.3, seed=1)
    layer = SparseLinear.from_dense(lin)
    call = PATHS[path]
    for batch in (1, 40):
        x = torch.randn(batch, 300)
        assert_close(call(layer, x), reference(lin, x))
    WRITERS[writer](getattr(layer, target), CORRUPTIONS[target])
    for batch in (1, 3, 40):
        x = torch.randn(batch, 300)
        try:
            out = call(layer, x)
        except ValueError as e:
            assert "out of range" in str(e) or "crow_indices" in str(e)
        else:
            assert_close(out, reference(lin, x))


def test_backward_after_untracked_structure_write_uses_the_validated_copy():
    lin = pruned(300, 70, 0.3, seed=2)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(5, 300, requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    layer.crow_indices.data[1:] = 2**40
    layer.col_indices.data[:] = 60000
    layer(x).sum().backward()  # torch's CSR matmul would read the corrupted tensors as they are
    assert torch.equal(x.grad, expected)


def test_tracked_structure_edit_after_an_untracked_one_is_validated():
    layer = SparseLinear.from_dense(pruned(300, 70, 0.3, seed=3))
    x = torch.randn(2, 300)
    layer(x)
    layer.col_indices.data[:] = 60000  # unseen ...
    with torch.no_grad():
        layer.crow_indices.add_(0)  # ... until a tracked edit makes the handle be rebuilt: refused
    with pytest.raises(ValueError, match="out of range"):
        with torch.no_grad():
            layer(x)
