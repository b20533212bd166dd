"""A shrunk model saved with sparsenet.save loads into the plain model built from its original config:
the file records every module's sizes, and load resizes the plain model's modules to them first."""
import copy

import pytest
import torch
from torch import nn

import sparsenet
import sparsenet.io as sio
from sparsenet.nn import SparseLinear
from sparsenet._sizes import module_sizes

from models import MLP, ConvFlatten, Depthwise, inputs
from test_io import rewrite, same_tensors, setitem, snapshot, unchanged
from test_shrink import MODELS, built


def sizes_of(model):
    return {name: module_sizes(m) for name, m in model.named_modules(remove_duplicate=False) if module_sizes(m)}


def kinds(model):
    """What load must keep of each tensor besides its shape."""
    return {k: (type(t), t.dtype, t.requires_grad) for k, t in model.state_dict(keep_vars=True).items()}


def shrunk(cls):
    model = built(cls)
    x = inputs(model)
    sparsenet.shrink(model, x, 0.5)
    return model, x


def plain(cls):
    torch.manual_seed(1)  # other weights than the shrunk model's: everything must come from the file
    return cls().eval()


def _saved(model, tmp_path):
    path = tmp_path / "saved.sn"
    sparsenet.save(model, path)
    return path


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_shrunk_model_loads_into_the_plain_model(tmp_path, cls):
    model, x = shrunk(cls)
    path = tmp_path / "shrunk.sn"
    sparsenet.save(model, path)
    fresh = plain(cls)
    assert sizes_of(fresh) != sizes_of(model)
    modules = dict(fresh.named_modules())
    assert sparsenet.load(path, fresh) is fresh
    assert dict(fresh.named_modules()) == modules  # resized in place, not replaced
    assert sizes_of(fresh) == sizes_of(model)  # a depthwise conv's groups included
    assert kinds(fresh) == kinds(model) and same_tensors(snapshot(fresh), snapshot(model))
    assert torch.equal(fresh(x), model(x))


def test_depthwise_sizes_in_the_header(tmp_path):
    model, _ = shrunk(Depthwise)
    path = tmp_path / "dw.sn"
    sparsenet.save(model, path)
    width = model.dw.out_channels
    assert width < 16
    recorded = sio.read_metadata(path)["sizes"]
    assert recorded["dw"] == {"in_channels": width, "out_channels": width, "groups": width}
    assert recorded["bn1"] == {"num_features": width} and recorded["head"] == {"in_features": 4, "out_features": 3}


class TiedPair(nn.Module):
    """Two layers holding one weight, multiplied together: one group, one tied tensor to resize."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) * self.b(x))


def test_tied_tensors_stay_tied(tmp_path):
    torch.manual_seed(0)
    model, x = TiedPair(), torch.randn(3, 6)
    sparsenet.shrink(model, x, 0.5)
    assert model.a.out_features < 10
    path = tmp_path / "tied.sn"
    sparsenet.save(model, path)
    fresh = TiedPair()
    sparsenet.load(path, fresh)
    assert fresh.a.weight is fresh.b.weight and isinstance(fresh.a.weight, nn.Parameter)
    assert sizes_of(fresh) == sizes_of(model) and torch.equal(fresh(x), model(x))


def bert(seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def test_bert_shrunk_loads_into_a_fresh_model(tmp_path):
    model, ids = bert(0), torch.randint(0, 100, (2, 7))
    sparsenet.shrink(model, {"input_ids": ids}, 0.5)
    assert model.encoder.layer[0].intermediate.dense.out_features < 64
    path = tmp_path / "bert.sn"
    sparsenet.save(model, path)
    assert sio.read_metadata(path)["sizes"]["embeddings.LayerNorm"] == {"normalized_shape": [32]}
    fresh = bert(1)
    assert sparsenet.load(path, fresh) is fresh
    assert sizes_of(fresh) == sizes_of(model)
    torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                               atol=1e-6, rtol=0)


def shrunk_pruned_sparse(cls=MLP):
    model, x = shrunk(cls)
    sparsenet.prune(model, 0.6, progress=False).finalize()
    model, _ = sparsenet.sparsify(model, min_sparsity=0.5)
    return model, x


def test_shrunk_pruned_sparsified_model_loads_into_the_plain_model(tmp_path):
    model, x = shrunk_pruned_sparse()
    assert isinstance(model.fc1, SparseLinear) and model.fc1.out_features < 24
    path = tmp_path / "sparse.sn"
    sparsenet.save(model, path)
    fresh = plain(MLP)
    dense_fc1 = fresh.fc1
    assert sparsenet.load(path, fresh) is fresh
    assert isinstance(fresh.fc1, SparseLinear) and sizes_of(fresh) == sizes_of(model)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)
    # The dense layer, resized in place before its SparseLinear replaced it, is what load_dense fills.
    assert dense_fc1.out_features == model.fc1.out_features
    dense = plain(MLP)
    assert sio.load_dense(path, dense) is dense and isinstance(dense.fc1, nn.Linear)
    assert dense.fc1.weight.shape == (model.fc1.out_features, 12)
    torch.testing.assert_close(dense(x), model(x), atol=1e-6, rtol=0)


def gpt2(seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2Model(config).eval()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparsified"])
def test_gpt2_conv1d_shrunk_loads_into_a_fresh_model(tmp_path, sparse):
    # The file records a SparseLinear's in/out features; the plain model has a Conv1D (nf, nx) there.
    model, ids = gpt2(0), torch.randint(0, 100, (2, 7))
    sparsenet.shrink(model, {"input_ids": ids, "use_cache": False}, 0.5)
    assert model.h[0].mlp.c_fc.nf < 128
    if sparse:
        sparsenet.prune(model, 0.6, progress=False).finalize()
        model, _ = sparsenet.sparsify(model, min_sparsity=0.5)
        assert isinstance(model.h[0].mlp.c_fc, SparseLinear)
    path = tmp_path / "gpt2.sn"
    sparsenet.save(model, path)
    fresh = gpt2(1)
    sparsenet.load(path, fresh)
    assert sizes_of(fresh) == sizes_of(model)
    torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                               atol=1e-6, rtol=0)


# ---- refusals: ValueError, and the model exactly as it was -------------------------------------

def drop_sizes(tensors, header):
    header.pop("sizes", None)  # as files written before sizes were recorded


def as_sparse_layer(model):
    model.fc1 = SparseLinear(12, 24)
    return model


@pytest.mark.parametrize("edit, make, match", [
    pytest.param(setitem(["sizes", "fc1", "out_features"], 5), plain, r"'fc1\.weight' has shape \(\d+, 12\), the "
                 r"model expects \(5, 12\)", id="width_disagrees_with_tensors"),
    pytest.param(setitem(["sizes", "fc2", "out_features"], 40), plain, "'fc2' is in_features=.*, out_features=40 "
                 "in the file, but the model's Linear 'fc2' is in_features=24, out_features=32: a file loads into "
                 "the model it was saved from, or into the plain model", id="wider_than_the_model"),
    pytest.param(setitem(["sizes", "fc1"], {"in_features": 12}), plain, r"'fc1\.weight' has shape \(\d+, 12\), the "
                 r"model expects \(24, 12\)", id="another_kind_of_module"),
    pytest.param(setitem(["sizes", "fc1"], {"out_features": "wide"}), plain, "malformed sizes entry for module 'fc1'",
                 id="malformed"),
    pytest.param(drop_sizes, plain, r"'fc1\.weight' has shape \(\d+, 12\), the model expects \(24, 12\)",
                 id="old_file_of_a_shrunk_model"),
    pytest.param(None, lambda cls: as_sparse_layer(plain(cls)), "the model's SparseLinear 'fc1' is in_features=12, "
                 "out_features=24; only Linear, Conv1D", id="not_resizable"),
])
def test_refused_files_leave_the_model_untouched(tmp_path, untouched, edit, make, match):
    model, _ = shrunk(MLP)
    path = _saved(model, tmp_path)
    if edit is not None:
        path = rewrite(path, tmp_path / "edited.sn", edit)
    fresh = make(MLP)
    check, sizes, modules = untouched(fresh), sizes_of(fresh), dict(fresh.named_modules())
    with pytest.raises(ValueError, match=match):
        sparsenet.load(path, fresh)
    check()
    assert sizes_of(fresh) == sizes and dict(fresh.named_modules()) == modules


def test_parametrized_module_is_not_resized(tmp_path):
    from torch.nn.utils import parametrize

    model, _ = shrunk(MLP)
    fresh = plain(MLP)
    parametrize.register_parametrization(fresh.fc1, "weight", nn.Identity())
    check = unchanged(fresh)
    with pytest.raises(ValueError, match="'fc1' is in_features=12, out_features=.* in the file, but the model's "
                       "ParametrizedLinear 'fc1' is in_features=12, out_features=24, and a parametrized module is not "
                       "resized"):
        sparsenet.load(_saved(model, tmp_path), fresh)
    check()


@pytest.mark.parametrize("record, match", [
    ({"in_channels": 3, "out_channels": 3, "groups": 1}, "records 'dw' as in_channels=3, out_channels=3, groups=1, "
     "which a Conv2d like the model's cannot be"),
    ({"in_channels": 16, "out_channels": 16, "groups": 3}, "which a Conv2d like the model's cannot be"),
])
def test_depthwise_record_that_no_conv_could_have_is_refused(tmp_path, untouched, record, match):
    model, _ = shrunk(Depthwise)
    path = rewrite(_saved(model, tmp_path), tmp_path / "edited.sn", setitem(["sizes", "dw"], record))
    fresh = plain(Depthwise)
    check, sizes = untouched(fresh), sizes_of(fresh)
    with pytest.raises(ValueError, match=match):
        sparsenet.load(path, fresh)
    check()
    assert sizes_of(fresh) == sizes


def test_tied_tensor_recorded_at_two_sizes_is_refused(tmp_path, untouched):
    torch.manual_seed(0)
    model, x = TiedPair(), torch.randn(3, 6)
    sparsenet.shrink(model, x, 0.5)
    width = model.a.out_features
    bad = rewrite(_saved(model, tmp_path), tmp_path / "edited.sn", setitem(["sizes", "b", "out_features"], width - 1))
    fresh = TiedPair()
    check = untouched(fresh)
    with pytest.raises(ValueError, match=r"b\.weight is tied to a tensor that the file records at another size"):
        sparsenet.load(bad, fresh)
    check()
    assert fresh.a.out_features == fresh.b.out_features == 10


def test_old_file_without_sizes_loads_as_before(tmp_path):
    # Written before sizes were recorded: nothing is resized; the (dense) model it was saved from
    # takes it, its layers converted to SparseLinear as they always were.
    model, x = shrunk(ConvFlatten)
    saved_from = copy.deepcopy(model)
    sparsenet.prune(model, 0.6, progress=False).finalize()
    model, _ = sparsenet.sparsify(model, min_sparsity=0.5)
    old = rewrite(_saved(model, tmp_path), tmp_path / "old.sn", drop_sizes)
    with torch.no_grad():
        for p in saved_from.parameters():
            p.zero_()
    assert sparsenet.load(old, saved_from) is saved_from and isinstance(saved_from.fc, SparseLinear)
    assert sizes_of(saved_from) == sizes_of(model) and torch.equal(saved_from(x), model(x))
