"""Test helpers shared across folders: one layer in another layout, and pruning by hand."""
import copy

import torch
from torch import nn


def as_conv1d(net: nn.Sequential) -> nn.Sequential:
    """The same network with every Linear replaced by a transformers Conv1D holding the transposed
    weight: the same function, in GPT-2's layout."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(net)
    for i, m in enumerate(net):
        if isinstance(m, nn.Linear):
            conv = Conv1D(m.out_features, m.in_features)
            with torch.no_grad():
                conv.weight.copy_(m.weight.T)
                conv.bias.copy_(m.bias)
            twin[i] = conv
    return twin


def as_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear computing what the transformers Conv1D ``conv`` computes."""
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear


def zero_linear_weights(model: nn.Module, fraction: float, seed: int = 0) -> nn.Module:
    """Prune by hand: zero about ``fraction`` of every nn.Linear's weights (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape, generator=g) < fraction] = 0
    return model
