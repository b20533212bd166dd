"""Which layers of a model get pruned.

Candidates are ``nn.Linear`` and ``nn.Conv2d`` modules (subclasses included) and Hugging Face's
``Conv1D`` (a transposed Linear, recognised by class name: see :mod:`sparsenet._weights`), named
by their qualified name. Skipped without asking:

* modules inside ``nn.MultiheadAttention``: its forward (and fused fast path) reads
  ``out_proj.weight`` / ``in_proj_weight`` directly as one unit, so attention is left to
  attention-aware structures rather than masked piecemeal;
* modules inside a parametrization list (a parametrization is not a layer of the model).

Skipped with a reason (:func:`select_layers` returns it, and the reports print it): a layer
whose weight is tied to another module's (a language model's head and its input embedding).
Masking it would mask one user of the tensor and not the other, and baking the mask would
zero the embedding too, so it is left dense.

``exclude`` patterns are fnmatch globs matched against each module's qualified name and its
ancestors' names, so ``"classifier"`` excludes everything under ``classifier``. A pattern that
matches no module at all is an error, so typos do not silently prune a layer meant to be kept.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from .._names import check_patterns_match, is_excluded
from .._weights import is_linear, stored_weight, tie_reasons
from .masks import has_foreign_parametrization, is_torch_pruned
from .report import skipped_lines

# Conv1D is not listed: it is recognised by name, so that transformers is never imported.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_OPAQUE_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    parametrize.ParametrizationList,
)


def is_prunable(module: nn.Module) -> bool:
    """A layer sparsenet prunes: ``nn.Linear``, ``nn.Conv2d`` (subclasses included) or Conv1D."""
    return is_linear(module) or isinstance(module, nn.Conv2d)


def check_no_foreign_parametrization(name: str, module: nn.Module) -> None:
    """Masking, scoring and baking read ``parametrizations.weight.original``, which weight_norm and
    other parametrizations replace or redefine: such a layer is refused, not misread."""
    if has_foreign_parametrization(module):
        raise ValueError(
            f"layer {name!r} has a parametrization on `weight` that is not sparsenet's mask; "
            "remove it first or exclude the layer"
        )


def _candidates(model: nn.Module, exclude: Sequence[str]) -> dict[str, nn.Module]:
    """Prunable layers outside opaque modules and ``exclude``, in module order."""
    check_patterns_match(model, exclude)
    layers: dict[str, nn.Module] = {}
    opaque: list[str] = []  # prefixes of subtrees to skip (named_modules is pre-order)
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in opaque):
            continue
        if isinstance(module, _OPAQUE_TYPES):
            opaque.append(f"{name}." if name else "")
            continue
        if is_prunable(module) and not is_excluded(name, exclude):
            layers[name] = module
    if not layers:
        raise ValueError(
            "model has no prunable layers (nn.Linear / nn.Conv2d / Conv1D) left after `exclude`"
        )
    return layers


def _check_layer(name: str, module: nn.Module) -> None:
    if is_torch_pruned(module):
        raise ValueError(
            f"layer {name!r} is pruned with torch.nn.utils.prune; call "
            "sparsenet.pruning.import_torch_pruning(model) to continue from its masks, "
            "sparsenet.pruning.remove_pruning(layer) to bake them, or exclude the layer"
        )
    check_no_foreign_parametrization(name, module)
    if isinstance(stored_weight(module), UninitializedParameter):
        raise ValueError(f"layer {name!r} is lazy and uninitialised; run a forward pass first")


def select_layers(
    model: nn.Module, exclude: Sequence[str] = ()
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to prune (qualified name -> layer, module order) and those left dense with the
    reason (name -> reason); raises ValueError on anything it cannot prune or skip, and when no
    layer is left.

    Nothing is modified, so callers can validate a whole model before touching it.
    """
    candidates = _candidates(model, exclude)
    for name, module in candidates.items():
        _check_layer(name, module)
    skipped = tie_reasons(model, candidates)
    layers = {name: module for name, module in candidates.items() if name not in skipped}
    if not layers:
        raise ValueError(
            "model has no prunable layers left: " + "; ".join(skipped_lines(skipped))
        )
    return layers, skipped


def find_prunable_layers(
    model: nn.Module, exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Qualified name -> layer, in module order, without the layers :func:`select_layers` leaves
    dense; raises ValueError on anything it cannot prune."""
    return select_layers(model, exclude)[0]
