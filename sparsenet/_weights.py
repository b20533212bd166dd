"""The stored weight of a layer, whether or not a mask parametrization sits on it.

A leaf module (torch only), so that calibration, pruning and reconstruction can all use it.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize


def stored_weight(module: nn.Module) -> Tensor:
    """The unmasked weight: the stored original under a parametrization (reading ``module.weight``
    would compute the masked one), ``module.weight`` otherwise."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(stored_weight(module).shape)
