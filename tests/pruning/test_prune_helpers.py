"""effective_weight_and_mask / remove_pruning under sparsenet and torch.nn.utils.prune."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from sparsenet.pruning import effective_weight_and_mask, prune, remove_pruning


def torch_pruned(amount=0.5):
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    torch_prune.l1_unstructured(layer, "weight", amount=amount)
    return layer


def sparsenet_pruned(sparsity=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    prune(model, sparsity, progress=False)
    return model[0]


@pytest.mark.parametrize("make", [torch_pruned, sparsenet_pruned])
def test_effective_weight_and_mask(make):
    layer = make()
    weight, mask = effective_weight_and_mask(layer)
    assert mask.dtype == torch.bool and mask.shape == (5, 6)
    assert int((~mask).sum()) == 15
    assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
    assert not weight.requires_grad
    torch.testing.assert_close(layer(torch.ones(1, 6)), weight.sum(1, keepdim=True).T + layer.bias)


def test_effective_weight_is_fresh_after_torch_prune_optimizer_step():
    layer = torch_pruned()
    with torch.no_grad():
        layer.weight_orig.add_(1.0)  # module.weight is stale until the next forward
    weight, mask = effective_weight_and_mask(layer)
    assert torch.equal(weight, (layer.weight_orig * layer.weight_mask).detach())


def test_effective_weight_of_unpruned_layer():
    layer = nn.Linear(3, 2)
    weight, mask = effective_weight_and_mask(layer)
    assert mask is None and torch.equal(weight, layer.weight.detach())


@pytest.mark.parametrize("make", [torch_pruned, sparsenet_pruned])
def test_remove_pruning_bakes_zeros(make):
    layer = make()
    weight, mask = effective_weight_and_mask(layer)
    mask = mask.clone()
    assert remove_pruning(layer) is True
    assert type(layer) is nn.Linear and isinstance(layer.weight, nn.Parameter)
    assert not parametrize.is_parametrized(layer) and not torch_prune.is_pruned(layer)
    assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
    assert torch.equal(layer.weight.detach(), weight)
    assert torch.all(layer.weight[~mask] == 0)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    assert remove_pruning(layer) is False  # nothing left to remove
    assert effective_weight_and_mask(layer)[1] is None


def test_torch_pruned_layer_can_be_repruned_after_remove():
    layer = torch_pruned(0.5)
    remove_pruning(layer)
    pruner = prune(nn.Sequential(layer), 0.7, progress=False)
    # Baked zeros are the smallest magnitudes, so they are among the 21 removed.
    assert int((~pruner.masks["0"]).sum()) == 21
    assert torch.all(layer.weight[~pruner.masks["0"]] == 0)


def test_remove_pruning_refuses_to_bake_foreign_parametrizations():
    layer = sparsenet_pruned()

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(layer, "weight", Double())
    with pytest.raises(ValueError, match="other parametrizations"):
        remove_pruning(layer)
