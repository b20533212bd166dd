"""Exact removal counts for layer and global scope, including ties and sparsity 0."""

import pytest
import torch
from torch import nn

from sparsenet.pruning import prune


def pruned_counts(pruner):
    return {name: int((~m).sum()) for name, m in pruner.masks.items()}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9, 0.999])
def test_layer_scope_removes_round_sparsity_times_numel(convnet, sparsity):
    pruner = prune(convnet, sparsity, progress=False)
    assert list(pruner.masks) == ["features.0", "features.2", "head.1", "classifier"]
    for name, mask in pruner.masks.items():
        assert mask.dtype == torch.bool
        assert mask.shape == pruner.layers[name].weight.shape
        assert int((~mask).sum()) == round(sparsity * mask.numel()), name


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.95])
def test_global_scope_removes_round_sparsity_times_total(convnet, sparsity):
    pruner = prune(convnet, sparsity, scope="global", progress=False)
    total = sum(m.numel() for m in pruner.masks.values())
    assert sum(pruned_counts(pruner).values()) == round(sparsity * total)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_all_equal_weights_still_give_exact_counts(mlp, scope):
    with torch.no_grad():
        for p in mlp.parameters():
            p.fill_(0.5)
    pruner = prune(mlp, 0.6, scope=scope, progress=False)
    counts = pruned_counts(pruner)
    sizes = {n: m.numel() for n, m in pruner.masks.items()}
    if scope == "layer":
        assert counts == {n: round(0.6 * s) for n, s in sizes.items()}
    else:
        assert sum(counts.values()) == round(0.6 * sum(sizes.values()))
        # Ties go to earlier layers first: the first layer (120 weights) is emptied before the next.
        assert counts["0"] == 120 and counts["4"] == 0
    # Within a layer, ties go to the lowest flat indices.
    first = pruner.masks["0"].reshape(-1)
    k = counts["0"]
    assert not first[:k].any() and first[k:].all()


def test_sparsity_zero_keeps_everything_and_changes_nothing(mlp):
    x = torch.randn(4, 12)
    expected = mlp(x)
    pruner = prune(mlp, 0.0, scope="global", progress=False)
    assert all(m.all() for m in pruner.masks.values())
    assert torch.equal(mlp(x), expected)


def test_report_rows_match_masks(convnet):
    pruner = prune(convnet, 0.5, progress=False)
    report = pruner.report()
    assert [r["name"] for r in report] == list(pruner.masks)
    for row in report:
        assert row["pruned"] == round(0.5 * row["numel"])
        assert row["sparsity"] == pytest.approx(row["pruned"] / row["numel"])
    assert report[0]["type"] == "Conv2d" and report[0]["shape"] == (8, 3, 3, 3)
    text = str(report)
    assert "features.0" in text and "classifier" in text and "total" in text


def test_mixed_dtypes_global_counts_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(9, 9), nn.Linear(9, 9).double(), nn.Linear(9, 9).bfloat16())
    pruner = prune(model, 0.4, scope="global", progress=False)
    assert sum(pruned_counts(pruner).values()) == round(0.4 * 243)


def test_progress_bar_can_be_forced(mlp, capsys):
    prune(mlp, 0.5, progress=True)
    assert "pruning" in capsys.readouterr().err
    prune(mlp, 0.5, progress=False)
    assert capsys.readouterr().err == ""
