"""Scopes: how many units each layer loses for a target sparsity.

A scope turns the layers' unit scores into per-layer removal counts. ``needs_all_scores`` tells
the planner whether it must hold every layer's scores at once (global) or may score, decide and
drop one layer at a time (layer), which bounds memory on large models.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from torch import Tensor

from .ranking import split_lowest_k


class Scope(Protocol):
    name: str
    needs_all_scores: bool

    def allocate(self, unit_scores: Sequence[Tensor], sparsity: float) -> list[int]:
        """Units to remove from each layer."""


class LayerScope:
    """Each layer loses exactly ``round(sparsity * units)``."""

    name = "layer"
    needs_all_scores = False

    def allocate(self, unit_scores: Sequence[Tensor], sparsity: float) -> list[int]:
        return [round(sparsity * s.numel()) for s in unit_scores]


class GlobalScope:
    """All layers together lose exactly ``round(sparsity * total units)``, lowest scores first.

    Scores are compared raw across layers, so a criterion's scale decides how sparsity spreads;
    a layer may lose all its units (per-layer floors come with sparsity allocation).
    """

    name = "global"
    needs_all_scores = True

    def allocate(self, unit_scores: Sequence[Tensor], sparsity: float) -> list[int]:
        total = sum(s.numel() for s in unit_scores)
        return split_lowest_k(unit_scores, round(sparsity * total))


_SCOPES: dict[str, Scope] = {s.name: s for s in (LayerScope(), GlobalScope())}


def available_scopes() -> list[str]:
    return sorted(_SCOPES)


def get_scope(name: str) -> Scope:
    if isinstance(name, str) and name in _SCOPES:
        return _SCOPES[name]
    raise ValueError(f"unknown scope {name!r}; known scopes: {', '.join(available_scopes())}")
