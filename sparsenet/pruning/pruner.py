"""The front door: ``prune(model, ...)`` validates, plans all masks, then applies them at once."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .criteria import Criterion, ScoreContext, get_criterion
from .gradients import LossFn
from .layers import find_prunable_layers
from .masks import find_weight_mask, remove_pruning, set_weight_mask
from .planning import plan_masks
from .report import PruningReport
from .scope import get_scope
from .structures import Structure, get_structure


class Pruner:
    """Handle on one pruning of a model: its masks, a report, and ``finalize``.

    ``masks`` are the live buffers of the layers' parametrizations (bool, weight-shaped, True =
    kept); do not modify them. After ``finalize`` they remain as a record of what was removed.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        masks: dict[str, Tensor],
        *,
        sparsity: float,
        criterion: str | Criterion,
        structure: str | Structure,
        scope: str,
        seed: Optional[int],
    ) -> None:
        self.model = model
        self.layers = layers
        self._masks = masks
        # Settings are kept so later schedules (pruner.step()) can re-run the same recipe.
        self.sparsity, self.criterion, self.structure = sparsity, criterion, structure
        self.scope, self.seed = scope, seed
        self.finalized = False

    @property
    def masks(self) -> dict[str, Tensor]:
        return dict(self._masks)

    def report(self) -> PruningReport:
        return PruningReport.from_masks(self._masks, self.layers)

    def finalize(self) -> nn.Module:
        """Write the zeros into plain ``weight`` Parameters and remove the parametrizations."""
        for module in self.layers.values():
            remove_pruning(module)
        self.finalized = True
        return self.model

    def __repr__(self) -> str:
        state = "finalized" if self.finalized else "masked"
        return (
            f"Pruner({len(self.layers)} layers, sparsity={self.sparsity}, "
            f"criterion={self.criterion!r}, scope={self.scope!r}, {state})"
        )


def _check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
    return value


def _resolve_sparsity(sparsity: object, structure: Structure) -> float:
    """The requested sparsity, or the one an N:M structure fixes (a different request raises)."""
    fixed = getattr(structure, "fixed_sparsity", None)
    if fixed is None:
        if sparsity is None:
            raise ValueError(f"sparsity is required for structure {structure.name!r}")
        return _check_sparsity(sparsity)
    if sparsity is not None and abs(_check_sparsity(sparsity) - fixed) > 1e-9:
        raise ValueError(
            f"structure {structure.name!r} fixes sparsity at {fixed:g}; sparsity={sparsity!r} "
            "conflicts with it (leave sparsity out)"
        )
    return fixed


def _check_exclude(exclude: object) -> tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    if isinstance(exclude, (list, tuple, set, frozenset)) and all(
        isinstance(p, str) for p in exclude
    ):
        return tuple(exclude)
    raise TypeError(f"exclude must be a list of names or glob patterns, got {exclude!r}")


def _check_seed(seed: object) -> Optional[int]:
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return seed
    raise TypeError(f"seed must be an int or None, got {seed!r}")


def _apply(layers: dict[str, nn.Module], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Install masks; on any failure undo the ones already installed, so no layer is half-done."""
    undo = []
    try:
        for name, module in layers.items():
            existing = find_weight_mask(module)
            previous = existing.mask.clone() if existing is not None else None
            set_weight_mask(module, masks[name])
            undo.append((module, previous))
    except BaseException:
        for module, previous in reversed(undo):
            if previous is None:
                torch.nn.utils.parametrize.remove_parametrizations(
                    module, "weight", leave_parametrized=False
                )
            else:
                find_weight_mask(module).mask.copy_(previous)
        raise
    return {name: find_weight_mask(module).mask for name, module in layers.items()}


def prune(
    model: nn.Module,
    sparsity: Optional[float] = None,
    criterion: str | Criterion = "magnitude",
    scope: str = "layer",
    exclude: Optional[Sequence[str]] = None,
    seed: Optional[int] = None,
    *,
    structure: str | Structure = "unstructured",
    block: Optional[tuple[int, int]] = None,
    calib: Optional[Iterable] = None,
    loss_fn: Optional[LossFn] = None,
    progress: Optional[bool] = None,
) -> Pruner:
    """Mask the weights of every ``nn.Linear`` / ``nn.Conv2d`` in ``model`` (in place).

    Args:
        model: the model; modified in place only after every check and mask has succeeded.
        sparsity: fraction of weights to remove, in [0, 1). ``scope="layer"`` removes exactly
            ``round(sparsity * numel)`` from each layer (to within one unit for structures);
            ``scope="global"`` removes ``round(sparsity * total)`` across the selected layers,
            ranking raw scores together. Leave it out for N:M, which fixes its own.
        criterion: a registered name (``"magnitude"``: |w|; ``"random"``; ``"wanda"``:
            |w| times the input's L2 norm per input feature; ``"taylor"``: |w * dL/dw| summed
            over calibration batches) or a callable ``(Layer, ScoreContext) -> scores``,
            optionally with ``.prepare(ctx)``. Lowest scores go first; ties go to the earlier
            layer, then the lower flat index, so masks are deterministic.
        scope: ``"layer"`` or ``"global"``.
        exclude: qualified module names or fnmatch globs (``["classifier", "*.out_proj"]``);
            excluding a module excludes everything under it. A pattern matching nothing raises.
            Layers inside ``nn.MultiheadAttention`` are always skipped.
        seed: seeds the ``"random"`` criterion; ``None`` uses torch's global RNG.
        structure: ``"unstructured"``; ``"N:M"`` such as ``"2:4"`` (N of every M consecutive
            weights along a row kept); ``"block"`` (r x c tiles kept or removed whole);
            ``"channel"`` (whole output rows / filters); or a structure object such as
            ``Channel(norm="l2")`` or ``Block(4, 4)``. See :mod:`sparsenet.pruning.structures`.
        block: ``(r, c)`` for ``structure="block"``; default 16x16.
        calib: calibration batches for ``"wanda"`` and ``"taylor"``: a re-iterable of tensors,
            ``(inputs, targets)`` pairs or dicts of keyword arguments
            (see :mod:`sparsenet.calibration`).
        loss_fn: ``loss_fn(output, batch) -> scalar`` for ``"taylor"``; default cross-entropy
            against the batch's targets.
        progress: show a tqdm bar over layers; ``None`` shows it for more than a few layers.

    Already-pruned layers (sparsenet's masks) are re-scored on their masked weights and the new
    mask is a subset of the old one, so ``sparsity`` is the layer's total, not an increment;
    a layer that is already sparser keeps its mask. Layers pruned with torch.nn.utils.prune
    raise: call :func:`remove_pruning` on them first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    structure_obj = get_structure(structure, block)
    value = _resolve_sparsity(sparsity, structure_obj)
    criterion_fn = get_criterion(criterion)
    scope_obj = get_scope(scope)
    patterns = _check_exclude(exclude)
    seed = _check_seed(seed)
    layers = find_prunable_layers(model, patterns)

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ctx = ScoreContext(
        generator=generator, model=model, layers=layers, calib=calib, loss_fn=loss_fn
    )
    masks = plan_masks(layers, value, criterion_fn, structure_obj, scope_obj, ctx, progress)
    live = _apply(layers, masks)
    return Pruner(
        model, layers, live,
        sparsity=value, criterion=criterion, structure=structure, scope=scope, seed=seed,
    )
