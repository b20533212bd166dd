"""Hand masks between torch.nn.utils.prune and sparsenet's mask parametrization, both ways.

torch keeps a pruned ``weight`` as a Parameter ``weight_orig``, a float buffer ``weight_mask``
and a forward pre-hook that writes ``weight = weight_orig * weight_mask`` before each call.
sparsenet keeps the same original under ``parametrizations.weight.original`` and a bool mask
(:class:`~sparsenet.pruning.masks.WeightMask`). Converting moves the original Parameter object
itself (so optimizers holding it keep working) and never bakes the mask into it.

Both functions check every layer before changing any, so a model that raises is left as it was.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .masks import WeightMask, find_weight_mask, has_foreign_parametrization, is_torch_pruned


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _torch_hook_key(module: nn.Module) -> int:
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == "weight":
            return key
    raise AssertionError("caller checked is_torch_pruned")


def import_torch_pruning(model: nn.Module) -> dict[str, Tensor]:
    """Turn every layer pruned by torch.nn.utils.prune (on ``weight``) into sparsenet's mask.

    The layer then reads the same weight (``where(mask, original, 0)``), with the same mask as
    bool, and torch's ``weight_orig`` / ``weight_mask`` and hook are gone, so
    ``sparsenet.prune(...)`` can continue from those masks. Pruning of other tensors (``bias``)
    is left to torch. Returns ``{layer name: bool mask}`` (empty when nothing was pruned).

    Raises ValueError, changing nothing, if a mask is not 0/1 (a bool mask could not reproduce
    it) or a layer's ``weight`` also carries a parametrization.
    """
    _check_model(model)
    found = [(n, m) for n, m in model.named_modules() if is_torch_pruned(m)]
    for name, module in found:
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {name!r} has both torch pruning and a weight parametrization")
        raw = module.weight_mask
        if not bool(((raw == 0) | (raw == 1)).all()):
            raise ValueError(
                f"layer {name!r} has a torch pruning mask with values other than 0 and 1; "
                "a keep/drop mask cannot reproduce it"
            )

    masks: dict[str, Tensor] = {}
    for name, module in found:
        orig = module._parameters["weight_orig"]
        keep = module._buffers["weight_mask"] != 0
        # Undo what torch's BasePruningMethod.apply did, without its remove() (which bakes).
        del module._forward_pre_hooks[_torch_hook_key(module)]
        del module._parameters["weight_orig"]
        del module._buffers["weight_mask"]
        delattr(module, "weight")  # torch's plain-attribute copy of the masked weight
        module.register_parameter("weight", orig)
        parametrize.register_parametrization(module, "weight", WeightMask(keep))
        masks[name] = find_weight_mask(module).mask
    return masks


def export_to_torch_pruning(model: nn.Module) -> dict[str, Tensor]:
    """Turn every sparsenet-masked layer into a torch.nn.utils.prune-pruned one.

    Uses ``torch.nn.utils.prune.custom_from_mask`` on the unbaked original, so afterwards
    ``prune.is_pruned(model)`` holds, ``prune.remove`` bakes, and the state_dict has torch's
    ``weight_orig`` / ``weight_mask`` keys. Returns ``{layer name: mask}`` as torch stores it
    (the weight's dtype). A :class:`~sparsenet.pruning.Pruner` over the model no longer drives
    these layers afterwards.

    Raises ValueError, changing nothing, if a masked ``weight`` also carries another
    parametrization (torch's pruning cannot hold it) or the model has no sparsenet masks.
    """
    _check_model(model)
    found = [(n, m) for n, m in model.named_modules() if find_weight_mask(m) is not None]
    if not found:
        raise ValueError("model has no sparsenet masks to export")
    for name, module in found:
        if has_foreign_parametrization(module):
            raise ValueError(
                f"layer {name!r} has other parametrizations on `weight` besides sparsenet's "
                "mask; torch.nn.utils.prune cannot carry them"
            )

    masks: dict[str, Tensor] = {}
    for name, module in found:
        keep = find_weight_mask(module).mask
        # leave_parametrized=False puts the original Parameter object back as `weight`.
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        torch_prune.custom_from_mask(module, "weight", keep.to(module.weight.dtype))
        masks[name] = module.weight_mask
    return masks
