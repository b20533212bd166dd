"""One-shot mask planning: score every layer, allocate counts, shape masks. Read-only.

Planning never touches the model, so every error (a criterion returning NaN, a bad shape)
surfaces before the first mask is applied.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._progress import bar_disabled
from .._weights import as_matrix, from_matrix, matrix_shape
from .criteria import Criterion, Layer, ScoreContext
from .masks import effective_weight_and_mask
from .ranking import lowest_k
from .scope import Scope
from .structures import Structure

AUTO_PROGRESS_MIN_LAYERS = 8  # below this a bar is noise


def _bar_disabled(progress: Optional[bool], n_layers: int) -> Optional[bool]:
    if progress is None and n_layers <= AUTO_PROGRESS_MIN_LAYERS:
        return True  # too few layers for a bar to be worth a line
    return bar_disabled(progress)


class _Planner:
    """Scores layers for a structure and turns its unit decisions into masks.

    Criteria score (and masks are) in the layer's own weight layout; structures see the
    ``(out, in * kernel)`` matrix (:func:`~sparsenet._weights.as_matrix`), so a Conv1D's groups,
    blocks and channels are exactly those of the Linear it is.
    """

    def __init__(self, criterion: Criterion, structure: Structure, ctx: ScoreContext) -> None:
        self.criterion, self.structure, self.ctx = criterion, structure, ctx
        self.modules: dict[str, nn.Module] = {}
        self.shapes: dict[str, tuple[int, int]] = {}  # matrix shapes
        self.old: dict[str, Optional[Tensor]] = {}

    def scores(self, name: str, module: nn.Module) -> Tensor:
        """The criterion's scores as the layer's weight matrix."""
        weight, old = effective_weight_and_mask(module)
        with torch.no_grad():
            scores = self.criterion(Layer(name, module, weight, old), self.ctx)
        if not isinstance(scores, Tensor) or scores.shape != weight.shape:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"criterion returned {got} for layer {name!r}; expected a tensor of shape "
                f"{tuple(weight.shape)}"
            )
        if not scores.is_floating_point():
            scores = scores.float()
        if torch.isnan(scores).any():
            raise ValueError(f"criterion returned NaN scores for layer {name!r}")
        if old is not None:
            # Already-pruned weights rank first (the structure says how they enter a group
            # score), and the new mask is intersected with the old one below.
            fill = getattr(self.structure, "pruned_score", float("-inf"))
            scores = scores.masked_fill(~old, fill)
        self.modules[name], self.old[name] = module, old
        scores = as_matrix(module, scores)
        self.shapes[name] = tuple(scores.shape)
        return scores

    def unit_scores(self, name: str, module: nn.Module) -> Tensor:
        return self.structure.units(self.scores(name, module))

    def unit_size(self, name: str) -> int:
        size = getattr(self.structure, "unit_size", None)
        return size(self.shapes[name]) if size is not None else 1

    def mask(self, name: str, units: Tensor, n_remove: int) -> Tensor:
        keep = self.structure.expand(lowest_k(units, n_remove), self.shapes[name])
        return self._with_old(name, keep)

    def fixed_mask(self, name: str, module: nn.Module) -> Tensor:
        return self._with_old(name, self.structure.keep(self.scores(name, module)))

    def _with_old(self, name: str, keep: Tensor) -> Tensor:
        """A matrix keep-mask in the layer's weight layout (contiguous: it becomes a buffer),
        within the layer's old mask."""
        keep = from_matrix(self.modules[name], keep).contiguous()
        old = self.old[name]
        return keep & old if old is not None else keep


def _misfit(structure: Structure, name: str, module: nn.Module) -> Optional[str]:
    shape = matrix_shape(module)
    misfit = getattr(structure, "misfit", None)
    if misfit is not None:
        return misfit(shape)
    check = getattr(structure, "check", None)  # a structure written to the raising protocol
    if check is not None:
        try:
            check(name, shape)
        except ValueError as e:
            return str(e)
    return None


def structure_misfits(layers: dict[str, nn.Module], structure: Structure) -> dict[str, str]:
    """Layer -> why ``structure`` cannot tile its weight matrix (N:M groups, blocks), for the
    layers it cannot; reads shapes only."""
    found = {name: _misfit(structure, name, module) for name, module in layers.items()}
    return {name: why for name, why in found.items() if why is not None}


def check_shapes(layers: dict[str, nn.Module], structure: Structure) -> None:
    """Raise, naming the layer, where a weight's shape does not fit ``structure``: for layers
    asked for by name, which cannot be left out quietly."""
    misfits = structure_misfits(layers, structure)
    if misfits:
        name, why = next(iter(misfits.items()))
        raise ValueError(f"layer {name!r}: {why}; exclude the layer or pick another structure")


def fit_structure(
    layers: dict[str, nn.Module], structure: Structure
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers ``structure`` fits, and the others with the reason (to be left dense).

    One misfit (a CNN's 3-channel stem under 2:4) does not refuse the model; a structure that
    fits no layer at all does.
    """
    misfits = structure_misfits(layers, structure)
    if len(misfits) == len(layers):
        listed = "; ".join(f"{n}: {why}" for n, why in list(misfits.items())[:5])
        more = f" (and {len(misfits) - 5} more)" if len(misfits) > 5 else ""
        raise ValueError(f"structure {structure.name!r} fits no layer: {listed}{more}")
    return {n: m for n, m in layers.items() if n not in misfits}, misfits


def plan_masks(
    layers: dict[str, nn.Module],
    sparsity: float,
    criterion: Criterion,
    structure: Structure,
    scope: Scope,
    ctx: ScoreContext,
    progress: Optional[bool] = None,
    limits: Optional[dict[str, tuple[float, float]]] = None,
) -> dict[str, Tensor]:
    """Bool keep-mask (weight-shaped) for each layer, in ``layers`` order.

    ``limits`` (from :func:`~sparsenet.pruning.allocation.resolve_limits`): per-layer
    (floor, cap); layer scope reads the floor as that layer's sparsity.

    Order of work: every layer's shape is checked against the structure, then the criterion's
    ``prepare`` (calibration passes) runs once, then layers are scored -- cheap errors first.
    """
    check_shapes(layers, structure)
    if not ctx.layers:
        ctx.layers = layers
    prepare = getattr(criterion, "prepare", None)
    if prepare is not None:
        prepare(ctx)
    planner = _Planner(criterion, structure, ctx)
    fixed = getattr(structure, "fixed_sparsity", None) is not None
    items = tqdm(
        layers.items(),
        total=len(layers),
        desc="pruning",
        unit="layer",
        disable=_bar_disabled(progress, len(layers)),
    )
    with items:
        if fixed:
            # The structure fixes every group's count itself: no scope, one layer at a time.
            return {name: planner.fixed_mask(name, module) for name, module in items}
        if not scope.needs_all_scores:
            # Decide each layer as soon as it is scored: only one layer's scores live at a time.
            masks = {}
            for name, module in items:
                units = planner.unit_scores(name, module)
                own = limits[name][0] if limits is not None else sparsity
                k = scope.allocate([units], own, [planner.unit_size(name)])[0]
                masks[name] = planner.mask(name, units, k)
            return masks
        units = {name: planner.unit_scores(name, module) for name, module in items}
    sizes = [planner.unit_size(name) for name in units]
    if limits is None:
        counts = scope.allocate(list(units.values()), sparsity, sizes)
    else:
        bounds = [limits[name] for name in units]
        counts = scope.allocate(list(units.values()), sparsity, sizes, bounds, list(units))
    return {name: planner.mask(name, u, k) for (name, u), k in zip(units.items(), counts)}
