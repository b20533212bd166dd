"""The stored weight of a layer, whether or not a mask parametrization sits on it, the layers that
are Linear layers in all but layout, and the layers whose weight another module holds too (tied).

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
from typing import Sequence

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


# ---- tied weights ----------------------------------------------------------------------------------

def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> qualified names of the distinct modules that hold it directly."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(mname)
    return owners


def _kind(module: nn.Module, count: int) -> str:
    """What ``count`` modules of ``module``'s type are, in words: "an embedding", "Linear modules"."""
    if isinstance(module, nn.Embedding):
        return "an embedding" if count == 1 else "embeddings"
    kind = type(module).__name__.removeprefix("Parametrized")
    if count > 1:
        return f"{kind} modules"
    return f"{'an' if kind[:1] in 'AEIOU' else 'a'} {kind}"


def _tie_reason(holders: Sequence[str], model: nn.Module) -> str:
    """Why a tied layer is left dense, naming the other holders grouped by type: "weight tied to
    transformer.wte (an embedding)"."""
    groups: dict[type, list[str]] = {}
    for name in holders:
        groups.setdefault(type(model.get_submodule(name)), []).append(name)
    parts = [
        f"{', '.join(names)} ({_kind(model.get_submodule(names[0]), len(names))})"
        for names in groups.values()
    ]
    return "weight tied to " + ", ".join(parts)


def _other_holders(name: str, weight, owners: dict[int, list[str]]) -> list[str]:
    """Modules other than layer ``name`` that hold ``weight``, by their own names."""
    # An already-masked weight is held by the layer's parametrization list, not the layer;
    # another masked layer's likewise, so holders are named by the layer above that list.
    found = dict.fromkeys(o.split(".parametrizations.")[0] for o in owners.get(id(weight), []))
    found.pop(name, None)
    return list(found)


def tie_reasons(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """The layers among ``layers`` whose weight another module of ``model`` holds too (a head tied
    to the input embedding), with the reason they stay dense: prune and sparsify word it alike."""
    owners = _weight_owners(model)
    reasons: dict[str, str] = {}
    for name, module in layers.items():
        holders = _other_holders(name, stored_weight(module), owners)
        if holders:
            reasons[name] = _tie_reason(holders, model)
    return reasons
