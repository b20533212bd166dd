"""Global scope ranks raw scores across layers exactly like a stable sort of everything."""

import pytest
import torch
from torch import nn

from sparsenet.pruning import prune


def brute_force_global_masks(model, sparsity):
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    k = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return list(torch.split(keep, [w.numel() for w in weights]))


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.87])
def test_global_masks_equal_brute_force(convnet, sparsity, quantize):
    if quantize:  # few distinct values: many ties that straddle the threshold
        with torch.no_grad():
            for p in convnet.parameters():
                p.copy_(torch.randint(-3, 4, p.shape).float())
    expected = brute_force_global_masks(convnet, sparsity)
    pruner = prune(convnet, sparsity, scope="global", progress=False)
    for got, want in zip(pruner.masks.values(), expected):
        assert torch.equal(got.reshape(-1), want)


def test_global_compares_raw_magnitudes(mlp):
    with torch.no_grad():
        mlp[4].weight.mul_(1000.0)  # this layer's smallest weight beats every other weight
        mlp[2].weight.mul_(1e-3)  # and every weight here loses to the others
    pruner = prune(mlp, 0.5, scope="global", progress=False)  # 106 of 211: all 70 of layer 2
    assert pruner.masks["4"].all()
    assert not pruner.masks["2"].any()
    assert int((~pruner.masks["0"]).sum()) == 106 - 70


def test_layer_scope_prunes_smallest_magnitudes_per_layer(mlp):
    pruner = prune(mlp, 0.5, progress=False)
    for name, mask in pruner.masks.items():
        w = pruner.layers[name].parametrizations.weight.original.detach().abs()
        assert w[~mask].max() <= w[mask].min()
