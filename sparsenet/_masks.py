"""Reading masks beside the weights: sparsenet's mask parametrization and torch.nn.utils.prune's.

sparsenet keeps a layer's keep-mask as a ``torch.nn.utils.parametrize`` parametrization on
``weight`` (:class:`WeightMask`): ``layer.weight`` reads masked, the dense original stays trainable
in ``layer.parametrizations.weight.original``. Every later stage (``sparsify``, reconstruction,
io) reads either that or torch's ``weight_orig``/``weight_mask`` through
:func:`effective_weight_and_mask`, so none depends on which mechanism pruned the layer.

A leaf module (torch only): inference code reads masks without importing the pruning package,
which owns writing them (:mod:`sparsenet.pruning.masks`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune


MASK_FORMAT_VERSION = 1


class WeightMask(nn.Module):
    """Parametrization that zeroes the weights where ``mask`` is False.

    The mask is stored in ``state_dict`` as ``<layer>.parametrizations.weight.0.mask``. Its layout
    version is ``_version``, which torch itself writes into ``state_dict._metadata`` for this
    module; loading a state_dict written by a newer layout is refused rather than misread.
    """

    # torch's per-module version mechanism: saved as state_dict._metadata[prefix]["version"].
    _version = MASK_FORMAT_VERSION

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        # A persistent buffer: the mask follows .to(device) and appears in state_dict.
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        # where(), not weight * mask: a NaN/inf under a pruned position must still read as 0.
        return torch.where(self.mask, weight, weight.new_zeros(()))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # No version (a hand-built or safetensors state_dict carries no metadata): layout 1.
        version = local_metadata.get("version")
        if version is not None and version > self._version:
            # Reported through error_msgs so torch raises its usual RuntimeError naming the
            # model; the mask is left as it was instead of being filled from an unknown layout.
            error_msgs.append(
                f"mask store at {prefix!r} has format version {version}, newer than this "
                f"sparsenet reads ({self._version}); upgrade sparsenet to load it"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _weight_parametrizations(module: nn.Module) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, "weight"):
        return []
    return list(module.parametrizations["weight"])


def find_weight_mask(module: nn.Module) -> Optional[WeightMask]:
    """sparsenet's mask parametrization on ``module.weight``, if any."""
    for p in _weight_parametrizations(module):
        if isinstance(p, WeightMask):
            return p
    return None


def has_foreign_parametrization(module: nn.Module) -> bool:
    """True when ``weight`` carries a parametrization that is not sparsenet's mask."""
    return any(not isinstance(p, WeightMask) for p in _weight_parametrizations(module))


def is_torch_pruned(module: nn.Module) -> bool:
    """True when torch.nn.utils.prune has a live pruning hook on ``module.weight``."""
    return any(
        isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == "weight"
        for h in module._forward_pre_hooks.values()
    )


def effective_weight_and_mask(module: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """The weight as the layer uses it (masked, detached) and its bool keep-mask.

    Works for sparsenet's parametrization and for torch.nn.utils.prune's ``weight_orig`` /
    ``weight_mask``; returns ``(weight, None)`` for a layer that is not pruned. The weight is
    computed fresh from the original and the mask (torch's cached ``module.weight`` can be stale
    after an optimizer step); the returned mask must not be modified.
    """
    with torch.no_grad():
        ours = find_weight_mask(module)
        if ours is not None:
            return module.weight.detach(), ours.mask
        if is_torch_pruned(module):
            keep = module.weight_mask != 0
            orig = module.weight_orig.detach()
            return torch.where(keep, orig, orig.new_zeros(())), keep
        return module.weight.detach(), None
