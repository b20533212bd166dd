"""Masks as parametrizations: forward, gradients, re-pruning, finalize."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsenet.pruning import WeightMask, prune


def test_weight_reads_masked_and_original_is_kept(mlp):
    dense = mlp[0].weight.detach().clone()
    pruner = prune(mlp, 0.5, progress=False)
    layer, mask = mlp[0], pruner.masks["0"]
    assert parametrize.is_parametrized(layer, "weight")
    assert torch.equal(layer.parametrizations.weight.original.detach(), dense)
    assert torch.equal(layer.weight, dense * mask)


def test_forward_uses_masked_weights(convnet):
    pruner = prune(convnet, 0.7, progress=False)
    x = torch.randn(2, 3, 8, 8)
    got = convnet(x)
    w = {
        n: m.parametrizations.weight.original.detach() * pruner.masks[n]
        for n, m in pruner.layers.items()
    }
    h = F.conv2d(x, w["features.0"], convnet.features[0].bias).relu()
    h = F.conv2d(h, w["features.2"], convnet.features[2].bias).flatten(1)
    h = F.linear(h, w["head.1"], convnet.head[1].bias).relu()
    want = F.linear(h, w["classifier"], convnet.classifier.bias)
    torch.testing.assert_close(got, want)


def test_gradients_reach_original_only_on_kept_weights(mlp):
    pruner = prune(mlp, 0.6, progress=False)
    mlp(torch.randn(5, 12)).square().sum().backward()
    for name, layer in pruner.layers.items():
        grad = layer.parametrizations.weight.original.grad
        mask = pruner.masks[name]
        assert grad is not None
        assert torch.all(grad[~mask] == 0)
        assert grad[mask].abs().sum() > 0


def test_pruned_positions_stay_zero_after_optimizer_step(mlp):
    pruner = prune(mlp, 0.5, progress=False)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, weight_decay=0.1)
    mlp(torch.randn(5, 12)).sum().backward()
    opt.step()
    for name, layer in pruner.layers.items():
        assert torch.all(layer.weight[~pruner.masks[name]] == 0)


def test_nan_under_mask_reads_as_zero():
    m = WeightMask(torch.tensor([True, False]))
    assert torch.equal(m(torch.tensor([1.0, float("nan")])), torch.tensor([1.0, 0.0]))


def test_finalize_leaves_plain_layers_with_exact_zeros(convnet):
    pruner = prune(convnet, 0.8, scope="global", progress=False)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    params = {n: l.parametrizations.weight.original for n, l in pruner.layers.items()}
    model = pruner.finalize()
    assert model is convnet
    assert pruner.report()[0]["type"] == "Conv2d"
    for name, layer in pruner.layers.items():
        assert type(layer) in (nn.Linear, nn.Conv2d)
        assert not parametrize.is_parametrized(layer)
        assert isinstance(layer.weight, nn.Parameter)
        assert layer.weight is params[name]  # same object: optimizers keep working
        assert torch.all(layer.weight[~masks[name]] == 0)
        assert torch.all(layer.weight[masks[name]] != 0)
    assert not any("parametrizations" in k for k in model.state_dict())
    pruner.finalize()  # idempotent


def test_state_dict_holds_original_and_mask(mlp):
    prune(mlp, 0.5, progress=False)
    keys = set(mlp.state_dict())
    assert {"0.parametrizations.weight.original", "0.parametrizations.weight.0.mask"} <= keys


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_repruning_refines_the_existing_mask(mlp, scope):
    first = {n: m.clone() for n, m in prune(mlp, 0.5, scope=scope, progress=False).masks.items()}
    second = prune(mlp, 0.8, scope=scope, progress=False)
    total = 0
    for name, mask in second.masks.items():
        assert not (mask & ~first[name]).any()  # subset of the old keep-mask
        assert len(mlp[int(name)].parametrizations.weight) == 1  # one mask, updated in place
        total += int((~mask).sum())
        if scope == "layer":
            assert int((~mask).sum()) == round(0.8 * mask.numel())
    assert total == round(0.8 * 211) or scope == "layer"


def test_repruning_to_lower_sparsity_keeps_the_sparser_mask(mlp):
    first = {n: m.clone() for n, m in prune(mlp, 0.6, progress=False).masks.items()}
    second = prune(mlp, 0.2, progress=False)
    for name, mask in second.masks.items():
        assert torch.equal(mask, first[name])


def test_conv2d_masks_follow_weight_shape(convnet):
    pruner = prune(convnet, 0.5, exclude=["head", "classifier"], progress=False)
    assert list(pruner.masks) == ["features.0", "features.2"]
    assert pruner.masks["features.2"].shape == (4, 8, 3, 3)
    assert not parametrize.is_parametrized(convnet.classifier)
