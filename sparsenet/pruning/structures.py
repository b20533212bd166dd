"""Structures: what unit is removed together, and how unit decisions become a weight mask.

A structure maps per-weight scores to per-unit scores (``units``: a 1-D tensor) and maps the
chosen units back to a keep-mask of the weight's shape (``expand``). Scopes then only count
units, so channel, block or neuron structures later reuse the same scopes and ranking.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Structure(Protocol):
    name: str

    def units(self, scores: Tensor) -> Tensor:
        """1-D unit scores (lower = prune first) from per-weight scores."""

    def expand(self, removed_units: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        """Bool keep-mask of ``weight_shape`` from a 1-D bool tensor of removed units."""


class Unstructured:
    """Every weight is its own unit."""

    name = "unstructured"

    def units(self, scores: Tensor) -> Tensor:
        return scores.reshape(-1)

    def expand(self, removed_units: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        return (~removed_units).view(weight_shape)


_STRUCTURES: dict[str, Structure] = {s.name: s for s in (Unstructured(),)}


def available_structures() -> list[str]:
    return sorted(_STRUCTURES)


def get_structure(name: str) -> Structure:
    if isinstance(name, str) and name in _STRUCTURES:
        return _STRUCTURES[name]
    raise ValueError(
        f"unknown structure {name!r}; known structures: {', '.join(available_structures())}"
    )
