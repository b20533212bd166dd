"""Importance criteria: how much each weight of a layer is worth keeping.

A criterion is any callable ``(layer, ctx) -> Tensor`` that returns one score per weight (same
shape as ``layer.weight``); lower scores are pruned first. Criteria only score: they never pick
counts or shapes, so every criterion works with every structure and scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Layer:
    """What a criterion may look at for one prunable layer."""

    name: str
    module: nn.Module
    weight: Tensor  # effective (already masked) weight, detached
    mask: Optional[Tensor]  # current keep-mask when the layer is already pruned, else None


@dataclass
class ScoreContext:
    """State shared by all layers of one pruning call.

    Kept as an object so later criteria (gradients, activation statistics) add fields here
    instead of changing every criterion's signature.
    """

    # None draws from the global RNG, so torch.manual_seed still applies.
    generator: Optional[torch.Generator] = None


Criterion = Callable[[Layer, ScoreContext], Tensor]

_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator that makes ``fn`` available as ``criterion=name``."""

    def deco(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = fn
        return fn

    return deco


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(criterion: str | Criterion) -> Criterion:
    """Resolve a name (or pass a callable through); unknown names list the known ones."""
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in _CRITERIA:
        return _CRITERIA[criterion]
    raise ValueError(
        f"unknown criterion {criterion!r}; known criteria: {', '.join(available_criteria())}"
    )


@register_criterion("magnitude")
def magnitude(layer: Layer, ctx: ScoreContext) -> Tensor:
    # Raw |w|, not normalised per layer: global scope must compare magnitudes across layers.
    return layer.weight.abs()


@register_criterion("random")
def random(layer: Layer, ctx: ScoreContext) -> Tensor:
    # Draw on CPU so one seeded generator gives the same masks on any device.
    scores = torch.rand(layer.weight.shape, generator=ctx.generator, dtype=torch.float32)
    return scores.to(layer.weight.device)
