"""Layers left dense with a reason: weights tied to another module's, structures that do not fit."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsenet.pruning import find_prunable_layers, prune


class TiedLM(nn.Module):
    """An embedding, a body and a head that reads the embedding's weight (GPT-2, T5, BART)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


class StemNet(nn.Module):
    """A CNN whose first conv reads 3 * 7 * 7 = 147 inputs per filter: no multiple of 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 7, padding=3)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).mean(dim=(2, 3)))


TIED = "weight tied to embed (an embedding)"


def test_a_head_tied_to_the_embedding_is_left_dense_and_reported():
    model = TiedLM()
    embedding = model.embed.weight.detach().clone()
    pruner = prune(model, 0.5, progress=False)
    assert list(pruner.masks) == ["body"]
    assert pruner.skipped == {"head": TIED}
    assert not parametrize.is_parametrized(model.head)
    report = pruner.report()
    assert report.skipped == {"head": TIED}
    assert report.with_positions({"body": 1}).skipped == {"head": TIED}
    lines = str(report).splitlines()
    assert lines[-1] == "head: weight tied to embed (an embedding); left dense"
    pruner.finalize()
    assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, embedding)
    assert list(find_prunable_layers(model)) == ["body"]


def test_naming_a_tied_layer_with_a_sparsity_is_an_error(untouched):
    model = TiedLM()
    check = untouched(model)
    with pytest.raises(ValueError, match=r"overrides\['head'\]=0.3 asks to prune 'head', which cannot "
                                         r"be: weight tied to embed \(an embedding\)"):
        prune(model, 0.5, overrides={"head": 0.3}, progress=False)
    check()
    # Skipping it, or excluding it, is what happens anyway.
    assert list(prune(model, 0.5, overrides={"head": None}, progress=False).masks) == ["body"]


def test_tie_reasons_group_the_other_holders_by_type():
    model = TiedLM()
    model.decoder_embed = nn.Embedding(20, 8)
    model.decoder_embed.weight = model.embed.weight
    model.twin = nn.Linear(8, 20, bias=False)
    model.twin.weight = model.embed.weight
    pruner = prune(model, 0.5, progress=False)
    assert pruner.skipped == {
        "head": "weight tied to embed, decoder_embed (embeddings), twin (a Linear)",
        "twin": "weight tied to embed, decoder_embed (embeddings), head (a Linear)",
    }


def test_excluded_tied_layer_is_not_reported():
    pruner = prune(TiedLM(), 0.5, exclude=["head"], progress=False)
    assert pruner.skipped == {}


@pytest.mark.parametrize("kwargs, reason", [
    ({"structure": "2:4"}, "2:4 needs its row length (147) to be a multiple of 4"),
    ({"structure": "block", "block": (4, 4), "sparsity": 0.5},
     "block 4x4 does not tile its 8x147 weight matrix"),
])
def test_a_layer_the_structure_cannot_tile_is_left_dense(kwargs, reason):
    model = StemNet()
    pruner = prune(model, progress=False, **kwargs)
    assert list(pruner.masks) == ["conv", "fc"]
    assert pruner.skipped == {"stem": reason}
    assert not parametrize.is_parametrized(model.stem)
    for mask in pruner.masks.values():
        assert 1 - mask.float().mean() == pytest.approx(0.5)
    assert f"stem: {reason}; left dense" in str(pruner.report())


def test_naming_a_misfit_layer_with_a_sparsity_is_an_error():
    with pytest.raises(ValueError, match=r"overrides\['stem'\]=0.3 asks to prune 'stem'.*8x147"):
        prune(StemNet(), 0.5, structure="block", block=(4, 4), overrides={"stem": 0.3}, progress=False)


def test_misfits_are_left_out_before_anything_is_scored(untouched):
    model = StemNet()
    check = untouched(model)
    scored = []

    def criterion(layer, ctx):
        scored.append(layer.name)
        return layer.weight.abs()

    with pytest.raises(ValueError, match=r"'2:4' fits no layer: stem: 2:4 needs its row length \(147\)"):
        prune(model, structure="2:4", exclude=["conv", "fc"], criterion=criterion, progress=False)
    check()
    assert scored == []
    prune(model, structure="2:4", criterion=criterion, progress=False)
    assert scored == ["conv", "fc"]
