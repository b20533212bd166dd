"""Bad input fails before anything is modified; layer selection and exclusion."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

import sparsenet.pruning.pruner as pruner_module
from sparsenet.pruning import find_prunable_layers, prune


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sparsity": 1.0}, ValueError, r"sparsity must be a float in \[0, 1\)"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": float("nan")}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, ValueError, "sparsity"),
        ({"sparsity": True}, ValueError, "sparsity"),
        ({"sparsity": 0.5, "criterion": "magnitud"}, ValueError, "known criteria: .*magnitude"),
        ({"sparsity": 0.5, "scope": "model"}, ValueError, "known scopes: global, layer"),
        ({"sparsity": 0.5, "structure": "diagonal"}, ValueError, "known structures: unstructured"),
        ({"sparsity": 0.5, "exclude": ["head.9"]}, ValueError, r"match no module: \['head.9'\]"),
        ({"sparsity": 0.5, "exclude": [3]}, TypeError, "exclude"),
        ({"sparsity": 0.5, "seed": 1.5}, TypeError, "seed"),
        ({"sparsity": 0.5, "exclude": ["*"]}, ValueError, "no prunable layers"),
    ],
)
def test_bad_input_raises_and_leaves_model_untouched(convnet, kwargs, error, match):
    before = snapshot(convnet)
    with pytest.raises(error, match=match):
        prune(convnet, progress=False, **kwargs)
    assert_untouched(convnet, before)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune({"w": torch.zeros(3)}, 0.5)


def test_model_without_prunable_layers():
    with pytest.raises(ValueError, match="no prunable layers"):
        prune(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5, progress=False)


def test_criterion_nan_fails_before_any_layer_is_masked(mlp):
    before = snapshot(mlp)

    def nan_on_last(layer, ctx):
        s = layer.weight.abs()
        return s * float("nan") if layer.name == "4" else s

    with pytest.raises(ValueError, match="NaN scores for layer '4'"):
        prune(mlp, 0.5, criterion=nan_on_last, progress=False)
    assert_untouched(mlp, before)


def test_criterion_wrong_shape(mlp):
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        prune(mlp, 0.5, criterion=lambda layer, ctx: torch.zeros(3), progress=False)


def test_failure_while_applying_rolls_back(mlp, monkeypatch):
    before = snapshot(mlp)
    real = pruner_module.set_weight_mask
    calls = []

    def flaky(module, mask):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("boom")
        real(module, mask)

    monkeypatch.setattr(pruner_module, "set_weight_mask", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        prune(mlp, 0.5, progress=False)
    assert_untouched(mlp, before)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in mlp.modules())


def test_exclude_names_globs_and_subtrees(convnet):
    names = list(find_prunable_layers(convnet, ["classifier", "features.*"]))
    assert names == ["head.1"]
    kept = ["features.0", "features.2", "classifier"]
    assert list(find_prunable_layers(convnet, ["head"])) == kept
    pruner = prune(convnet, 0.5, exclude="classifier", progress=False)
    assert "classifier" not in pruner.masks
    assert not parametrize.is_parametrized(convnet.classifier)


def test_multihead_attention_internals_are_skipped(attnnet):
    assert list(find_prunable_layers(attnnet)) == ["proj"]
    # Naming an MHA internal in exclude is not a typo.
    pruner = prune(attnnet, 0.5, exclude=["*.out_proj"], progress=False)
    assert list(pruner.masks) == ["proj"]
    attnnet(torch.randn(3, 2, 8))  # MHA still runs


def test_torch_pruned_layer_raises(mlp):
    torch_prune.l1_unstructured(mlp[2], "weight", amount=0.3)
    with pytest.raises(ValueError, match="torch.nn.utils.prune.*remove_pruning"):
        prune(mlp, 0.5, progress=False)
    assert not any(parametrize.is_parametrized(m) for m in mlp.modules())


def test_foreign_parametrization_raises(mlp):
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(mlp[0], "weight", Double())
    with pytest.raises(ValueError, match="not sparsenet's mask"):
        prune(mlp, 0.5, progress=False)


def test_only_tied_layers_left_raises_with_their_reasons():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"no prunable layers left: 0: weight tied to 1 \(a Linear\); "
                                         r"left dense; 1: weight tied to 0 \(a Linear\); left dense"):
        prune(nn.Sequential(a, b), 0.5, progress=False)


def test_shared_module_is_pruned_once():
    lin = nn.Linear(4, 4)
    pruner = prune(nn.Sequential(lin, nn.ReLU(), lin), 0.5, progress=False)
    assert list(pruner.masks) == ["0"]
