"""One-shot mask planning: score every layer, allocate counts, shape masks. Read-only.

Planning never touches the model, so every error (a criterion returning NaN, a bad shape)
surfaces before the first mask is applied.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .criteria import Criterion, Layer, ScoreContext
from .masks import effective_weight_and_mask
from .ranking import lowest_k
from .scope import Scope
from .structures import Structure

AUTO_PROGRESS_MIN_LAYERS = 8  # below this a bar is noise


def _bar_disabled(progress: Optional[bool], n_layers: int) -> Optional[bool]:
    if progress is None:
        # None lets tqdm hide itself when stderr is not a terminal (CI logs, notebooks' files).
        return None if n_layers > AUTO_PROGRESS_MIN_LAYERS else True
    return not progress


class _Planner:
    def __init__(self, criterion: Criterion, structure: Structure, ctx: ScoreContext) -> None:
        self.criterion, self.structure, self.ctx = criterion, structure, ctx
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.old: dict[str, Optional[Tensor]] = {}

    def unit_scores(self, name: str, module: nn.Module) -> Tensor:
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
            # Already-pruned weights rank first, so the new mask is a subset of the old one.
            scores = scores.masked_fill(~old, float("-inf"))
        self.shapes[name], self.old[name] = tuple(weight.shape), old
        return self.structure.units(scores)

    def mask(self, name: str, units: Tensor, n_remove: int) -> Tensor:
        keep = self.structure.expand(lowest_k(units, n_remove), self.shapes[name])
        old = self.old[name]
        return keep & old if old is not None else keep


def plan_masks(
    layers: dict[str, nn.Module],
    sparsity: float,
    criterion: Criterion,
    structure: Structure,
    scope: Scope,
    ctx: ScoreContext,
    progress: Optional[bool] = None,
) -> dict[str, Tensor]:
    """Bool keep-mask (weight-shaped) for each layer, in ``layers`` order."""
    planner = _Planner(criterion, structure, ctx)
    items = tqdm(
        layers.items(),
        total=len(layers),
        desc="pruning",
        unit="layer",
        disable=_bar_disabled(progress, len(layers)),
    )
    with items:
        if not scope.needs_all_scores:
            # Decide each layer as soon as it is scored: only one layer's scores live at a time.
            masks = {}
            for name, module in items:
                units = planner.unit_scores(name, module)
                masks[name] = planner.mask(name, units, scope.allocate([units], sparsity)[0])
            return masks
        units = {name: planner.unit_scores(name, module) for name, module in items}
    counts = scope.allocate(list(units.values()), sparsity)
    return {name: planner.mask(name, u, k) for (name, u), k in zip(units.items(), counts)}
