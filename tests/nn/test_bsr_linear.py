"""SparseLinear over the block-sparse (BSR) format: the same module, forward semantics, autograd,
compile/export, sparsify (including prune(structure="block") end to end), save/load and the CLI."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.formats import PackedBSR
from sparsenet.nn import SparseLinear


def block_linear(out_features=40, in_features=50, block=(8, 8), density=0.4, seed=0):
    """Kept in whole blocks, partial ones at the edges (40 x 50 is not a multiple of 8 x 8)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    r, c = block
    keep = torch.rand(-(-out_features // r), -(-in_features // c), generator=g) < density
    with torch.no_grad():
        layer.weight.mul_(keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out_features, :in_features])
    return layer


def test_forward_matches_the_dense_layer_in_float64(isa):
    dense = block_linear()
    sparse = SparseLinear.from_dense(dense, format="bsr")
    assert sparse.format == "bsr" and sparse.to_packed().block == (8, 8)  # found by from_dense
    assert set(dict(sparse.named_buffers())) == {"block_shape", "block_ptr", "block_cols"}
    for x in (torch.randn(5, 50), torch.randn(2, 3, 50), torch.randn(50, 9).t(), torch.randn(1, 50),
              torch.randn(40, 50)):
        want = F.linear(x.double(), dense.weight.double(), dense.bias.double())
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.to_dense(), dense.weight.detach())
    assert "format=bsr" in repr(sparse)
    explicit = SparseLinear.from_dense(dense, format="bsr", block=(4, 16))
    assert explicit.to_packed().block == (4, 16)
    torch.testing.assert_close(explicit.to_dense(), dense.weight.detach())


def test_gradients_reach_the_input_and_the_bias():
    dense = block_linear()
    sparse = SparseLinear.from_dense(dense, format="bsr")
    x = torch.randn(4, 50, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    sparse(x).square().sum().backward()
    dense(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_and_export_keep_the_op():
    sparse = SparseLinear.from_dense(block_linear(), format="bsr").eval()
    x = torch.randn(3, 50)
    try:
        with torch.no_grad():
            want = sparse(x)
            got = torch.compile(sparse, backend="eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    program = torch.export.export(sparse, (x,))
    assert "sparsenet.bsr_linear" in str(program.graph)
    torch.testing.assert_close(program.module()(x), want)


def test_pruned_in_blocks_sparsified_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    sparsenet.prune(model, sparsity=0.75, structure="block", block=(16, 16), progress=False)
    x = torch.randn(6, 64)
    with torch.no_grad():
        want = model(x)
    sparse, report = sparsenet.sparsify(model, format="bsr")
    assert [r.format for r in report.converted] == ["bsr", "bsr"]
    r, c = sparse[0].to_packed().block  # 16 x 16, or larger where kept blocks happen to line up
    assert r % 16 == 0 and c % 16 == 0
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)
    path = tmp_path / "bsr.sn"
    sparsenet.save(sparse, path)
    meta = sparsenet.io.read_metadata(path)["modules"]
    assert [m["format"] for m in meta] == ["bsr", "bsr"] and meta[0]["block"] == [r, c]
    plain = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    loaded = sparsenet.load(path, plain)
    assert isinstance(loaded[0], SparseLinear) and loaded[0].format == "bsr"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))


def test_unstructured_weights_are_refused_with_a_clear_error():
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(32, 32) < 0.3)
    with pytest.raises(ValueError, match="not made of blocks.*block=\\(r, c\\)"):
        SparseLinear.from_dense(layer, format="bsr")
    with pytest.raises(ValueError, match="cannot be converted.*not made of blocks"):
        sparsenet.sparsify(nn.Sequential(layer), format="bsr")


def test_state_dict_with_another_block_count_and_malformed_ones():
    a = SparseLinear.from_dense(block_linear(density=0.3), format="bsr")
    b = SparseLinear.from_dense(block_linear(density=0.8, seed=3), format="bsr")
    a.load_state_dict(b.state_dict())
    assert a.nnz == b.nnz and torch.equal(a.to_dense(), b.to_dense())
    empty = SparseLinear(50, 40, format="bsr")  # default 16 x 16 blocks: another block_ptr length
    empty.load_state_dict(b.state_dict())
    torch.testing.assert_close(empty.to_dense(), b.to_dense())
    broken = b.state_dict()
    broken["block_cols"] = broken["block_cols"].flip(0).contiguous()
    with pytest.raises(RuntimeError, match="invalid packed bsr weight.*strictly increasing"):
        a.load_state_dict(broken)


def test_tracked_structure_edit_is_validated_again():
    sparse = SparseLinear.from_dense(block_linear(), format="bsr")
    x = torch.randn(2, 50)
    with torch.no_grad():
        before = sparse(x)
        assert sparse._prepared.handle.keeps_buffers
        sparse.values.mul_(2)
        torch.testing.assert_close(sparse(x) - sparse.bias, 2 * (before - sparse.bias))
        sparse.block_cols[0] = 99  # out of range: a new handle is built and refuses it
        with pytest.raises(ValueError, match="outside"):
            sparse(x)
