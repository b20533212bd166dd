"""Writing masks beside the weights: set sparsenet's mask parametrization, or bake it in.

The mask store itself (:class:`WeightMask`) and the readers live in the leaf module
:mod:`sparsenet._masks`, which inference code reads without this package.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .._masks import (  # noqa: F401 (the pruning package's own names for them)
    MASK_FORMAT_VERSION,
    WeightMask,
    effective_weight_and_mask,
    find_weight_mask,
    has_foreign_parametrization,
    is_torch_pruned,
)


def set_weight_mask(module: nn.Module, mask: Tensor) -> None:
    """Mask ``module.weight`` with ``mask``: update sparsenet's mask in place, or add one.

    Updating in place keeps the buffer's identity, so anything already holding the mask
    (a Pruner, an optimizer hook) sees the new one.
    """
    existing = find_weight_mask(module)
    if existing is not None:
        existing.mask.copy_(mask)
    else:
        parametrize.register_parametrization(module, "weight", WeightMask(mask))


def remove_pruning(module: nn.Module) -> bool:
    """Bake the mask into a plain ``weight`` Parameter and drop the pruning machinery.

    Handles sparsenet's parametrization and torch.nn.utils.prune. The Parameter object is kept
    (its data is overwritten), so optimizers that hold it keep working. Returns whether the
    layer was pruned. Raises if sparsenet's mask shares ``weight`` with another
    parametrization, since baking would silently bake that one too.
    """
    if find_weight_mask(module) is not None:
        if has_foreign_parametrization(module):
            raise ValueError(
                "weight has other parametrizations besides sparsenet's mask; "
                "remove them first (baking would fold them into the weight)"
            )
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return True
    if is_torch_pruned(module):
        torch_prune.remove(module, "weight")
        return True
    return False
