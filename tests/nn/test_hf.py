"""sparsenet.nn.hf.guard_save_pretrained: save_pretrained refuses a model holding SparseLinear layers,
which from_pretrained would silently re-initialise, and points to sparsenet.save / sparsenet.load."""
import copy
import io

import pytest
import torch
from torch import nn

import sparsenet
from sparsenet.nn import SparseLinear
from sparsenet.nn.hf import guard_save_pretrained

transformers = pytest.importorskip("transformers")


def config():
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)


def sparsified(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape) < 0.8] = 0
    model, _ = sparsenet.sparsify(model, min_sparsity=0.5)
    return guard_save_pretrained(model)


@pytest.fixture()
def bert():
    torch.manual_seed(0)
    return sparsified(transformers.BertModel(config()).eval())


def refuses(model, folder):
    with pytest.raises(ValueError, match=r"BertModel.save_pretrained cannot save this model: it holds 13 "
                                         r"SparseLinear layer\(s\).*sparsenet\.save\(model, .*sparsenet\.load\("):
        model.save_pretrained(folder)
    assert not folder.exists()  # refused before anything is written


def saves(model, folder):
    model.save_pretrained(folder)
    assert (folder / "config.json").is_file()
    return transformers.AutoModel.from_pretrained(folder)


def test_sparsified_model_refuses_and_plain_model_saves(bert, tmp_path):
    refuses(bert, tmp_path / "sparse")
    torch.manual_seed(1)
    plain = transformers.BertModel(config())
    assert guard_save_pretrained(plain) is plain and "save_pretrained" not in vars(plain)  # nothing to guard
    reloaded = saves(plain, tmp_path / "plain")
    assert torch.equal(reloaded.encoder.layer[0].output.dense.weight, plain.encoder.layer[0].output.dense.weight)


def test_guard_follows_the_object(bert, tmp_path):
    assert bert.to(torch.float32) is bert and bert.train().eval() is bert
    refuses(bert, tmp_path / "moved")
    buf = io.BytesIO()
    torch.save(bert, buf)  # pickles the guard (plain pickle cannot: torch does not unpickle uint16 tensors)
    buf.seek(0)
    for clone in (copy.deepcopy(bert), torch.load(buf, weights_only=False)):
        refuses(clone, tmp_path / "clone")
        assert vars(clone)["save_pretrained"]._model() is clone  # watches the copy, not the original


def test_densified_model_saves_again(bert, tmp_path):
    dense_copy = sparsenet.densify(bert)  # a deep copy, guard included: it checks the copy's layers
    saves(dense_copy, tmp_path / "copy")
    refuses(bert, tmp_path / "original")
    sparsenet.densify(bert, inplace=True)
    saves(bert, tmp_path / "inplace")


def test_nested_pretrained_models_are_guarded(tmp_path):
    torch.manual_seed(0)
    model = sparsified(transformers.BertForSequenceClassification(config()).eval())
    with pytest.raises(ValueError, match="BertForSequenceClassification.save_pretrained cannot save"):
        model.save_pretrained(tmp_path / "outer")
    refuses(model.bert, tmp_path / "inner")  # a PreTrainedModel too: its own save_pretrained is guarded


def test_only_models_that_look_like_pretrained_models_are_touched():
    layer = SparseLinear(4, 2)
    net = nn.Sequential(layer)
    assert guard_save_pretrained(net) is net and all("save_pretrained" not in vars(m) for m in net.modules())


def test_load_guards_what_it_returns(bert, tmp_path):
    path = tmp_path / "bert.sn"
    sparsenet.save(bert, path)
    torch.manual_seed(2)
    loaded = sparsenet.load(path, transformers.BertModel(config()).eval())
    refuses(loaded, tmp_path / "loaded")
