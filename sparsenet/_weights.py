"""The stored weight of a layer, whether or not a mask parametrization sits on it, and the layers that
are Linear layers in all but layout.

A leaf module (torch only), so that calibration, pruning, reconstruction, conversion and io can all
use it.

Hugging Face's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: GPT-2, and others) is a Linear
layer whose weight is stored transposed, ``(in_features, out_features)``, and whose forward is
``x @ weight + bias``. sparsenet treats it as the Linear it is: everything that sees a weight as a
matrix sees ``(out, in)`` through :func:`as_matrix`, and writes back through :func:`from_matrix`.
It is recognised by class name and module, so transformers is never imported for it.
"""
from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.utils import parametrize


def stored_weight(module: nn.Module) -> Tensor:
    """The unmasked weight: the stored original under a parametrization (reading ``module.weight``
    would compute the masked one), ``module.weight`` otherwise."""
    if parametrize.is_parametrized(module, "weight"):
        # A parametrization that splits the weight (weight_norm: original0, original1) has no
        # single original: the computed weight stands for it.
        originals = module.parametrizations["weight"]
        if hasattr(originals, "original"):
            return originals.original
    return module.weight


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(stored_weight(module).shape)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's transposed Linear (``transformers.pytorch_utils.Conv1D``), subclasses included."""
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a layer that is one in all but layout (Conv1D)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or Conv1D."""
    return matrix_shape(module)


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in * kernel)``: the shape :func:`as_matrix` gives the layer's weight."""
    shape = weight_shape(module)
    if is_conv1d(module):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def as_matrix(module: nn.Module, t: Tensor) -> Tensor:
    """A weight-shaped tensor of ``module`` as the ``(out, in * kernel)`` matrix: a view for
    ``nn.Linear`` / ``nn.Conv2d``, the transpose (a view too) for Conv1D."""
    if is_conv1d(module):
        return t.t()
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def from_matrix(module: nn.Module, m: Tensor) -> Tensor:
    """Inverse of :func:`as_matrix`: an ``(out, in * kernel)`` matrix in the module's weight layout."""
    if is_conv1d(module):
        return m.t()
    return m.reshape(weight_shape(module))
