"""SparseLinear over the structured formats (block-sparse BSR, N:M): the same module, forward
semantics, autograd, compile/export, sparsify (from prune(structure=...) end to end), state_dict and
save/load as with CSR, each format found from the weight's own structure."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.nn import SparseLinear

from call_paths import assert_compiled_and_exported_keep, assert_gradients_match_dense


def block_weight(out_features=40, in_features=50, block=(8, 8), density=0.4, seed=0):
    """Kept in whole blocks, partial ones at the edges (40 x 50 is not a multiple of 8 x 8)."""
    g = torch.Generator().manual_seed(seed)
    r, c = block
    keep = torch.rand(-(-out_features // r), -(-in_features // c), generator=g) < density
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out_features, :in_features]
    return torch.randn(out_features, in_features, generator=g) * keep


def nm_weight(out_features=40, in_features=50, n=2, m=4, seed=0):
    """N of every M kept (a few groups keep fewer); 50 columns: a partial last group of 2."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-in_features // m)
    order = torch.rand(out_features, groups, m, generator=g).argsort(dim=-1)
    keep = (order < n).reshape(out_features, -1)[:, :in_features] & (torch.rand(out_features, in_features, generator=g) < 0.9)
    return torch.randn(out_features, in_features, generator=g) * keep


CASES = {"bsr": (block_weight, "block", (8, 8), ("block_shape", "block_ptr", "block_cols")),
         "nm": (nm_weight, "pattern", (2, 4), ("pattern", "indices"))}


def linear(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def structure_of(layer: SparseLinear, fmt: str):
    packed = layer.to_packed()
    return packed.block if fmt == "bsr" else packed.nm


@pytest.fixture(params=sorted(CASES))
def fmt(request):
    return request.param


def test_forward_matches_the_dense_layer_in_float64(isa, fmt):
    make, option, found, buffers = CASES[fmt]
    dense = linear(make())
    sparse = SparseLinear.from_dense(dense, format=fmt)
    assert sparse.format == fmt and structure_of(sparse, fmt) == found  # found by from_dense
    assert set(dict(sparse.named_buffers())) == set(buffers)
    for x in (torch.randn(5, 50), torch.randn(2, 3, 50), torch.randn(50, 9).t(), torch.randn(1, 50),
              torch.randn(40, 50)):
        want = F.linear(x.double(), dense.weight.double(), dense.bias.double())
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.to_dense(), dense.weight.detach())
    assert f"format={fmt}" in repr(sparse)


def test_explicit_structure_option():
    dense = linear(block_weight())
    assert SparseLinear.from_dense(dense, format="bsr", block=(4, 16)).to_packed().block == (4, 16)
    dense = linear(nm_weight(in_features=48))
    as_4_8 = SparseLinear.from_dense(dense, format="nm", pattern=(4, 8))  # 2:4 is also 4:8
    assert as_4_8.to_packed().nm == (4, 8)
    torch.testing.assert_close(as_4_8.to_dense(), dense.weight.detach())
    with pytest.raises(ValueError, match="row 0, columns 0..1 keep 2 weights: more than 1 of 2"):
        SparseLinear.from_dense(linear(torch.ones(4, 8) * torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0])), format="nm",
                                pattern=(1, 2))


def test_gradients_reach_the_input_and_the_bias(fmt):
    dense = linear(CASES[fmt][0]())
    sparse = SparseLinear.from_dense(dense, format=fmt)
    assert_gradients_match_dense(sparse, dense, torch.randn(4, 50))


def test_compile_fullgraph_and_export_keep_the_op(fmt):
    sparse = SparseLinear.from_dense(linear(CASES[fmt][0]()), format=fmt)
    assert_compiled_and_exported_keep(sparse, torch.randn(3, 50), f"{fmt}_linear")


@pytest.mark.parametrize("fmt, option", [("bsr", {"structure": "block", "block": (16, 16), "sparsity": 0.75}),
                                         ("nm", {"structure": "2:4"})])
def test_pruned_sparsified_saved_and_loaded(tmp_path, fmt, option):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    sparsenet.prune(model, progress=False, **option)
    x = torch.randn(6, 64)
    with torch.no_grad():
        want = model(x)
    sparse, report = sparsenet.sparsify(model, format=fmt)
    assert [r.format for r in report.converted] == [fmt, fmt]
    if fmt == "bsr":
        r, c = structure_of(sparse[0], fmt)  # 16 x 16, or larger where kept blocks happen to line up
        assert r % 16 == 0 and c % 16 == 0
    else:
        assert structure_of(sparse[0], fmt) == (2, 4)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)
    path = tmp_path / f"{fmt}.sn"
    sparsenet.save(sparse, path)
    meta = sparsenet.io.read_metadata(path)["modules"]
    assert [m["format"] for m in meta] == [fmt, fmt]
    plain = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    loaded = sparsenet.load(path, plain)
    assert isinstance(loaded[0], SparseLinear) and loaded[0].format == fmt
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))


def test_unstructured_weights_are_refused_with_a_clear_error(fmt):
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(32, 32) < 0.3)
    expected = "not made of blocks.*block=\\(r, c\\)" if fmt == "bsr" else "follow no N:M pattern.*pattern=\\(n, m\\)"
    with pytest.raises(ValueError, match=expected):
        SparseLinear.from_dense(layer, format=fmt)
    with pytest.raises(ValueError, match="cannot be converted"):
        sparsenet.sparsify(nn.Sequential(layer), format=fmt)


def test_state_dict_with_another_size_and_malformed_ones(fmt):
    # Weights storing different numbers of values (BSR: of blocks; N:M: of padding slots).
    make = {"bsr": lambda seed, density: block_weight(density=density, seed=seed),
            "nm": lambda seed, density: nm_weight(seed=seed)}[fmt]
    a = SparseLinear.from_dense(linear(make(1, 0.3)), format=fmt)
    b = SparseLinear.from_dense(linear(make(3, 0.8)), format=fmt)
    a.load_state_dict(b.state_dict())
    assert a.nnz == b.nnz and torch.equal(a.to_dense(), b.to_dense())
    empty = SparseLinear(50, 40, format=fmt)  # the format's default structure: other buffer sizes
    empty.load_state_dict(b.state_dict())
    torch.testing.assert_close(empty.to_dense(), b.to_dense())
    broken = b.state_dict()
    name = "block_cols" if fmt == "bsr" else "indices"
    broken[name] = broken[name].flip(0).contiguous()
    with pytest.raises(RuntimeError, match=f"invalid packed {fmt} weight"):
        a.load_state_dict(broken)


def test_tracked_structure_edit_is_validated_again(fmt):
    sparse = SparseLinear.from_dense(linear(CASES[fmt][0]()), format=fmt)
    x = torch.randn(2, 50)
    with torch.no_grad():
        before = sparse(x)
        assert sparse._prepared.handle.keeps_buffers
        sparse.values.mul_(2)
        torch.testing.assert_close(sparse(x) - sparse.bias, 2 * (before - sparse.bias))
        if fmt == "bsr":
            sparse.block_cols[0] = 99  # out of range: a new handle is built and refuses it
            message = "outside"
        else:
            sparse.indices[0] = 0  # every slot of the first groups at column 0: not increasing
            message = "strictly increasing"
        with pytest.raises(ValueError, match=message):
            sparse(x)


@pytest.mark.parametrize("batch", [1, 40])
def test_in_place_value_edit_reaches_the_copy_of_the_values(isa, batch):
    # The BSR handle keeps a copy of the values on AVX2 (16-row blocks): a tracked edit must give a
    # new handle, and so a new copy.
    sparse = SparseLinear.from_dense(linear(block_weight(48, 64, block=(16, 16))), format="bsr")
    x = torch.randn(batch, 64)
    with torch.no_grad():
        before = sparse(x)
        sparse.values.mul_(2)
        torch.testing.assert_close(sparse(x) - sparse.bias, 2 * (before - sparse.bias))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # (torch's, for nn.Linear)
@pytest.mark.parametrize("every_format", ["csr", "bitmap", "bsr", "nm"])
@pytest.mark.parametrize("shape", [(0, 8), (8, 0)])  # no outputs, no inputs
def test_empty_layers_forward_and_backward_like_nn_linear(every_format, shape):
    dense = nn.Linear(shape[1], shape[0])
    options = {"bsr": {"block": (4, 4)}, "nm": {"pattern": (2, 4)}}.get(every_format, {})
    sparse = SparseLinear.from_dense(dense, format=every_format, **options)
    x = torch.randn(2, 3, shape[1], requires_grad=True)
    y = sparse(x)
    torch.testing.assert_close(y, dense(x))
    y.sum().backward()
    assert x.grad.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))  # the prepared path too
