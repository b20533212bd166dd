"""Which layers of a model get pruned.

Candidates are ``nn.Linear`` and ``nn.Conv2d`` modules (subclasses included), named by their
qualified name. Skipped without asking:

* modules inside ``nn.MultiheadAttention``: its forward (and fused fast path) reads
  ``out_proj.weight`` / ``in_proj_weight`` directly as one unit, so attention is left to
  attention-aware structures rather than masked piecemeal;
* modules inside a parametrization list (a parametrization is not a layer of the model).

``exclude`` patterns are fnmatch globs matched against each module's qualified name and its
ancestors' names, so ``"classifier"`` excludes everything under ``classifier``. A pattern that
matches no module at all is an error, so typos do not silently prune a layer meant to be kept.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from .masks import find_weight_mask, has_foreign_parametrization, is_torch_pruned

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_OPAQUE_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    parametrize.ParametrizationList,
)


def _ancestors_and_self(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(n, p) for n in _ancestors_and_self(name) for p in patterns)


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> qualified names of the distinct modules that hold it directly."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(mname)
    return owners


def _underlying_weight(module: nn.Module):
    if find_weight_mask(module) is not None:
        return module.parametrizations["weight"].original
    return module.weight


def check_no_foreign_parametrization(name: str, module: nn.Module) -> None:
    """Masking, scoring and baking read ``parametrizations.weight.original``, which weight_norm and
    other parametrizations replace or redefine: such a layer is refused, not misread."""
    if has_foreign_parametrization(module):
        raise ValueError(
            f"layer {name!r} has a parametrization on `weight` that is not sparsenet's mask; "
            "remove it first or exclude the layer"
        )


def find_prunable_layers(
    model: nn.Module, exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Qualified name -> layer, in module order; raises ValueError on anything it cannot prune.

    Nothing is modified, so callers can validate a whole model before touching it.
    """
    all_names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in exclude if not any(fnmatchcase(n, p) for n in all_names)]
    if unmatched:
        raise ValueError(f"exclude patterns match no module: {unmatched}")

    layers: dict[str, nn.Module] = {}
    opaque: list[str] = []  # prefixes of subtrees to skip (named_modules is pre-order)
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in opaque):
            continue
        if isinstance(module, _OPAQUE_TYPES):
            opaque.append(f"{name}." if name else "")
            continue
        if isinstance(module, PRUNABLE_TYPES) and not _is_excluded(name, exclude):
            layers[name] = module
    if not layers:
        raise ValueError(
            "model has no prunable layers (nn.Linear / nn.Conv2d) left after `exclude`"
        )

    owners = _weight_owners(model)
    for name, module in layers.items():
        if is_torch_pruned(module):
            raise ValueError(
                f"layer {name!r} is pruned with torch.nn.utils.prune; call "
                "sparsenet.pruning.import_torch_pruning(model) to continue from its masks, "
                "sparsenet.pruning.remove_pruning(layer) to bake them, or exclude the layer"
            )
        check_no_foreign_parametrization(name, module)
        weight = _underlying_weight(module)
        if isinstance(weight, UninitializedParameter):
            raise ValueError(f"layer {name!r} is lazy and uninitialised; run a forward pass first")
        # The parametrization list, not the layer, holds an already-masked weight.
        own = {name, f"{name}.parametrizations.weight"}
        holders = [o for o in owners.get(id(weight), []) if o not in own]
        if holders:
            raise ValueError(
                f"layer {name!r} shares its weight with {holders}; masking one would not mask "
                "the other, so exclude the tied layer"
            )
    return layers
