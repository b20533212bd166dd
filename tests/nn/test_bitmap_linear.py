"""SparseLinear over the bitmap format: the same module, forward semantics, autograd, compile/export,
sparsify and save/load as with CSR, on every ISA."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.formats import PackedBitmap, registry
from sparsenet.nn import SparseLinear

from call_paths import assert_compiled_and_exported_keep, assert_gradients_match_dense


def pruned_linear(out_features=24, in_features=37, density=0.5, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < density)
    return layer


def test_forward_matches_the_dense_layer_in_float64(isa):
    dense = pruned_linear()
    sparse = SparseLinear.from_dense(dense, format="bitmap")
    assert sparse.format == "bitmap" and isinstance(sparse.to_packed(), PackedBitmap)
    assert set(dict(sparse.named_buffers())) == {"masks", "row_ptr"}
    for x in (torch.randn(5, 37), torch.randn(2, 3, 37), torch.randn(37, 9).t(), torch.randn(1, 37)):
        want = F.linear(x.double(), dense.weight.double(), dense.bias.double())
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.to_dense(), dense.weight.detach())
    assert "format=bitmap" in repr(sparse)


def test_gradients_reach_the_input_and_the_bias():
    dense = pruned_linear()
    sparse = SparseLinear.from_dense(dense, format="bitmap")
    assert_gradients_match_dense(sparse, dense, torch.randn(4, 37))


def test_compile_fullgraph_and_export_keep_the_op():
    sparse = SparseLinear.from_dense(pruned_linear(), format="bitmap")
    assert_compiled_and_exported_keep(sparse, torch.randn(3, 37), "bitmap_linear")


def test_sparsify_converts_to_bitmap_and_reports_fewer_bytes_than_csr():
    model = nn.Sequential(pruned_linear(64, 256, 0.4), nn.ReLU(), pruned_linear(8, 64, 0.4))
    x = torch.randn(6, 256)
    with torch.no_grad():
        want = model(x)
    as_bitmap, report = sparsenet.sparsify(model, format="bitmap")
    as_csr, csr_report = sparsenet.sparsify(model)
    assert [r.format for r in report.converted] == ["bitmap", "bitmap"]
    assert all(isinstance(m, SparseLinear) and m.format == "bitmap" for m in (as_bitmap[0], as_bitmap[2]))
    assert sum(r.bytes_after for r in report.rows) < sum(r.bytes_after for r in csr_report.rows)
    with torch.no_grad():
        torch.testing.assert_close(as_bitmap(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown sparse format 'coo'; known: bitmap, bsr, csr, nm"):
        sparsenet.sparsify(model, format="coo")


def test_save_and_load_into_the_plain_model_and_a_csr_file_still_loads(tmp_path):
    model = nn.Sequential(pruned_linear(16, 40, 0.4), nn.ReLU(), pruned_linear(4, 16, 0.3, seed=1))
    sparse, _ = sparsenet.sparsify(model, format="bitmap")
    path = tmp_path / "bitmap.sn"
    sparsenet.save(sparse, path)
    assert [m["format"] for m in sparsenet.io.read_metadata(path)["modules"]] == ["bitmap", "bitmap"]
    plain = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 4))
    loaded = sparsenet.load(path, plain)
    assert isinstance(loaded[0], SparseLinear) and loaded[0].format == "bitmap"
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
    csr, _ = sparsenet.sparsify(model, format="csr")
    sparsenet.save(csr, tmp_path / "csr.sn")
    # A model whose sparse layers hold another format (format="auto" chooses per machine) takes the
    # file's: its layers are replaced, as dense ones are.
    again = sparsenet.load(tmp_path / "csr.sn", loaded)
    assert again[0].format == "csr" and again[2].format == "csr"
    with torch.no_grad():
        torch.testing.assert_close(again(x), sparse(x))


def test_state_dict_with_another_number_of_weights_and_malformed_ones():
    a = SparseLinear.from_dense(pruned_linear(density=0.3), format="bitmap")
    b = SparseLinear.from_dense(pruned_linear(density=0.7, seed=3), format="bitmap")
    a.load_state_dict(b.state_dict())
    assert a.nnz == b.nnz and torch.equal(a.to_dense(), b.to_dense())
    broken = b.state_dict()
    broken["row_ptr"] = broken["row_ptr"].clone()
    broken["row_ptr"][1] += 1
    with pytest.raises(RuntimeError, match="invalid packed bitmap weight"):
        a.load_state_dict(broken)
    with pytest.raises(ValueError, match="nnz must be 0 for format 'bitmap'"):
        SparseLinear(37, 24, nnz=5, format="bitmap")
    assert registry.names() == ["bitmap", "bsr", "csr", "nm"]


def test_tracked_structure_edit_is_validated_again():
    sparse = SparseLinear.from_dense(pruned_linear(), format="bitmap")
    x = torch.randn(2, 37)
    with torch.no_grad():
        before = sparse(x)
        assert sparse._prepared.handle.keeps_buffers  # eager inference: the prepared handle
        sparse.values.mul_(2)  # a tracked edit of the values: a new handle, the new weights
        torch.testing.assert_close(sparse(x) - sparse.bias, 2 * (before - sparse.bias))
        sparse.masks[0] = 0xFFFF  # row 0 now claims more weights than row_ptr gives it
        with pytest.raises(ValueError, match="row 0 stores"):
            sparse(x)
