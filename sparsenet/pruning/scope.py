"""Scopes: how many units each layer loses for a target sparsity.

A scope turns the layers' unit scores into per-layer removal counts. ``needs_all_scores`` tells
the planner whether it must hold every layer's scores at once (global) or may score, decide and
drop one layer at a time (layer), which bounds memory on large models.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

from .allocation import (
    Bounds, bounded_lowest, bounded_split_lowest, check_feasible, unit_bounds,
)
from .ranking import split_lowest_k


class Scope(Protocol):
    name: str
    needs_all_scores: bool

    def allocate(
        self, unit_scores: Sequence[Tensor], sparsity: float, unit_sizes: Sequence[int]
    ) -> list[int]:
        """Units to remove from each layer; ``unit_sizes[i]``: weights per unit of layer i."""


class LayerScope:
    """Each layer loses exactly ``round(sparsity * units)`` (units of one layer are equal)."""

    name = "layer"
    needs_all_scores = False

    def allocate(
        self, unit_scores: Sequence[Tensor], sparsity: float, unit_sizes: Sequence[int]
    ) -> list[int]:
        return [round(sparsity * s.numel()) for s in unit_scores]


class GlobalScope:
    """All layers together lose ``round(sparsity * total weights)``, lowest unit scores first.

    Exact when all units have the same size (weights, blocks); with units of different sizes
    (channels of different widths) removal stops at the unit that lands closest to the target,
    so the total is within half of one unit. Scores are compared raw across layers, so a
    criterion's scale decides how sparsity spreads; a layer may lose all its units (per-layer
    floors come with sparsity allocation).
    """

    name = "global"
    needs_all_scores = True

    def allocate(
        self,
        unit_scores: Sequence[Tensor],
        sparsity: float,
        unit_sizes: Sequence[int],
        limits: Optional[Sequence[Bounds]] = None,
        names: Optional[Sequence[str]] = None,
    ) -> list[int]:
        """``limits[i]``: (floor, cap) fractions of layer i's units; layer i then loses between
        round(floor * units) and round(cap * units) units, wherever the ranking puts the rest."""
        n_units = [s.numel() for s in unit_scores]
        if limits is not None and any(lo > 0.0 or hi < 1.0 for lo, hi in limits):
            floors, caps = unit_bounds(limits, n_units)
            names = list(names) if names is not None else list(range(len(n_units)))
            if len(set(unit_sizes)) <= 1:  # counted in units, exactly as without limits
                k = round(sparsity * sum(n_units))
                unit = "weight" if set(unit_sizes) <= {1} else "unit"
                check_feasible(floors, caps, k, names, unit)
                return bounded_split_lowest(unit_scores, k, floors, caps)
            # Units of different widths: feasibility in weights; total within half a unit.
            target = round(sparsity * sum(n * size for n, size in zip(n_units, unit_sizes)))
            weights = lambda c: [x * s for x, s in zip(c, unit_sizes)]  # noqa: E731
            check_feasible(weights(floors), weights(caps), target, names, "weight")
            return bounded_lowest(unit_scores, unit_sizes, target, floors, caps)
        if len(set(unit_sizes)) <= 1:
            total = sum(s.numel() for s in unit_scores)
            return split_lowest_k(unit_scores, round(sparsity * total))
        return _weighted_lowest(unit_scores, unit_sizes, sparsity)


def _weighted_lowest(
    unit_scores: Sequence[Tensor], unit_sizes: Sequence[int], sparsity: float
) -> list[int]:
    """Units per layer among the lowest-scored prefix whose weight total is nearest the target.

    A full stable sort is fine here: only structured units (a few per row or block) reach it.
    """
    flat = torch.cat([s.reshape(-1).double().cpu() for s in unit_scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(unit_scores)])
    sizes = torch.tensor(unit_sizes, dtype=torch.float64)[owner]
    order = torch.sort(flat, stable=True).indices  # ties: earlier layer, then lower index
    removed = torch.cumsum(sizes[order], 0)
    target = round(sparsity * float(sizes.sum()))
    k = int(torch.searchsorted(removed, torch.tensor([float(target)]), right=True))
    # removed[k-1] <= target < removed[k]: take unit k too if that lands strictly closer.
    below = float(removed[k - 1]) if k else 0.0
    if k < len(removed) and float(removed[k]) - target < target - below:
        k += 1
    return torch.bincount(owner[order[:k]], minlength=len(unit_scores)).tolist()


_SCOPES: dict[str, Scope] = {s.name: s for s in (LayerScope(), GlobalScope())}


def available_scopes() -> list[str]:
    return sorted(_SCOPES)


def get_scope(name: str) -> Scope:
    if isinstance(name, str) and name in _SCOPES:
        return _SCOPES[name]
    raise ValueError(f"unknown scope {name!r}; known scopes: {', '.join(available_scopes())}")
