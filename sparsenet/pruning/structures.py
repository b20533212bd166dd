"""Structures: what unit is removed together, and how unit decisions become a weight mask.

A structure maps per-weight scores to per-unit scores (``units``: a 1-D tensor) and maps the
chosen units back to a keep-mask of the weight's shape (``expand``); ``unit_size`` is the number
of weights in one unit. Scopes then only count units, so every structure reuses the same scopes
and ranking. ``misfit`` names why a layer's shape cannot be tiled (``None`` when it can), before
anything is scored: such a layer is left dense. A structure that fixes its own pattern (N:M)
instead has ``fixed_sparsity`` and ``keep(scores)``: scopes do not apply to it.

Every structure sees a weight as a matrix ``(rows, cols)`` (scores, shapes and masks alike; the
planner converts with :func:`sparsenet._weights.as_matrix`): ``nn.Linear`` as ``(out, in)``,
Hugging Face's ``Conv1D`` (stored ``(in, out)``) as the same ``(out, in)``, ``nn.Conv2d`` as
``(out_channels, in_channels/groups * kh * kw)`` -- a filter is one row, and N:M groups and
blocks run along that flattened ``(in_channel, kh, kw)`` axis, in that order.

Group scores (channel, block) are the ``norm`` ("l1": mean |s|, "l2": root mean square) of
their weights' scores. Dividing by the group size changes nothing within a layer (all groups
there have the same size) but lets global scope compare a 64-weight channel with a 4096-weight
one on the same footing, as a per-weight average rather than a sum that favours wide layers.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

DEFAULT_BLOCK = (16, 16)


class Structure(Protocol):
    name: str
    # Score an already-pruned weight gets before grouping (-inf: it goes first).
    pruned_score: float

    def misfit(self, weight_shape: tuple[int, int]) -> Optional[str]:
        """Why the structure cannot tile this weight matrix, or None. (Optional; a structure
        may instead have ``check(layer_name, shape)`` raising ValueError.)"""

    def units(self, scores: Tensor) -> Tensor:
        """1-D unit scores (lower = prune first) from per-weight scores."""

    def unit_size(self, weight_shape: tuple[int, ...]) -> int:
        """Weights per unit."""

    def expand(self, removed_units: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        """Bool keep-mask of ``weight_shape`` from a 1-D bool tensor of removed units."""


def _matrix(shape: Sequence[int]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _group_score(groups: Tensor, norm: str) -> Tensor:
    """Per-row norm of a ``(n_groups, group_size)`` score matrix, divided by the group size."""
    if norm == "l1":
        return groups.abs().mean(dim=1)
    return groups.pow(2).mean(dim=1).sqrt()


def _check_norm(norm: object) -> str:
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    return norm


class Unstructured:
    """Every weight is its own unit."""

    name = "unstructured"
    pruned_score = float("-inf")

    def units(self, scores: Tensor) -> Tensor:
        return scores.reshape(-1)

    def unit_size(self, weight_shape: tuple[int, ...]) -> int:
        return 1

    def expand(self, removed_units: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        return (~removed_units).view(weight_shape)


class Channel:
    """Whole output rows (Linear neurons, Conv2d filters), ranked by the norm of their scores.

    Only the weight is masked: the bias stays, so a removed channel outputs its bias until
    the layer is physically shrunk.
    """

    # An already-pruned weight counts as 0, so a channel removed before ranks first again.
    pruned_score = 0.0

    def __init__(self, norm: str = "l1") -> None:
        self.norm = _check_norm(norm)
        self.name = "channel"

    def units(self, scores: Tensor) -> Tensor:
        return _group_score(scores.reshape(scores.shape[0], -1), self.norm)

    def unit_size(self, weight_shape: tuple[int, ...]) -> int:
        return _matrix(weight_shape)[1]

    def expand(self, removed_units: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        rows, cols = _matrix(weight_shape)
        # contiguous(): the mask becomes a buffer updated in place later; an expanded view
        # (stride 0) cannot be.
        return (~removed_units).view(rows, 1).expand(rows, cols).contiguous().view(weight_shape)

    def __repr__(self) -> str:
        return f"Channel(norm={self.norm!r})"


class Block:
    """``r x c`` tiles of the weight matrix, kept or removed whole by the norm of their scores.

    A weight matrix that ``r x c`` does not tile exactly is a misfit (no padding: a padded edge
    block would be scored on fewer weights and could not be stored as a full block).
    """

    pruned_score = 0.0

    def __init__(self, r: int = DEFAULT_BLOCK[0], c: int = DEFAULT_BLOCK[1], norm: str = "l1"):
        for v in (r, c):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"block must be two positive ints (rows, cols), got {(r, c)!r}")
        self.r, self.c, self.norm = r, c, _check_norm(norm)
        self.name = "block"

    def misfit(self, weight_shape: tuple[int, ...]) -> Optional[str]:
        rows, cols = _matrix(weight_shape)
        if rows % self.r or cols % self.c:
            return f"block {self.r}x{self.c} does not tile its {rows}x{cols} weight matrix"
        return None

    def units(self, scores: Tensor) -> Tensor:
        rows, cols = _matrix(scores.shape)
        tiles = scores.reshape(rows // self.r, self.r, cols // self.c, self.c).transpose(1, 2)
        return _group_score(tiles.reshape(-1, self.r * self.c), self.norm)

    def unit_size(self, weight_shape: tuple[int, ...]) -> int:
        return self.r * self.c

    def expand(self, removed_units: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        rows, cols = _matrix(weight_shape)
        keep = (~removed_units).view(rows // self.r, 1, cols // self.c, 1)
        keep = keep.expand(rows // self.r, self.r, cols // self.c, self.c)
        return keep.contiguous().view(weight_shape)

    def __repr__(self) -> str:
        return f"Block({self.r}, {self.c}, norm={self.norm!r})"


class NM:
    """N:M: in every run of M consecutive weights along a row, N are kept and M-N removed.

    "2:4" keeps 2 of every 4 (50% sparsity). The sparsity is fixed at (M-N)/M in every layer,
    so scope has no effect. The M-N lowest scores of each group go (ties: lower index first).
    On a layer that was already sparser, the old zeros stay: groups then keep at most N.
    A row length not divisible by M is a misfit (no padding: kernels need whole groups).
    """

    pruned_score = float("-inf")

    def __init__(self, n: int, m: int) -> None:
        if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m:
            raise ValueError(f"N:M structure needs 1 <= N < M, got {n}:{m}")
        self.n, self.m = n, m
        self.name = f"{n}:{m}"
        self.fixed_sparsity = (m - n) / m

    def misfit(self, weight_shape: tuple[int, ...]) -> Optional[str]:
        cols = _matrix(weight_shape)[1]
        if cols % self.m:
            return f"{self.name} needs its row length ({cols}) to be a multiple of {self.m}"
        return None

    def keep(self, scores: Tensor) -> Tensor:
        groups = scores.reshape(-1, self.m)
        drop = torch.sort(groups, dim=1, stable=True).indices[:, : self.m - self.n]
        keep = torch.ones(groups.shape, dtype=torch.bool, device=scores.device)
        return keep.scatter_(1, drop, False).view(scores.shape)

    def __repr__(self) -> str:
        return f"NM({self.n}, {self.m})"


_NAMES = ("unstructured", "channel", "block", "N:M")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def available_structures() -> list[str]:
    return list(_NAMES)


def get_structure(spec: object, block: Optional[Sequence[int]] = None) -> Structure:
    """Resolve ``"unstructured"``, ``"channel"``, ``"block"`` (with ``block=(r, c)``, default
    16x16), ``"N:M"`` such as ``"2:4"``, or pass a structure object through."""
    if block is not None and spec != "block":
        raise ValueError(f"block={tuple(block)!r} only applies to structure='block'")
    if not isinstance(spec, str):
        if hasattr(spec, "keep") or (hasattr(spec, "units") and hasattr(spec, "expand")):
            return spec
    elif spec == "unstructured":
        return Unstructured()
    elif spec == "channel":
        return Channel()
    elif spec == "block":
        shape = DEFAULT_BLOCK if block is None else tuple(block)
        if len(shape) != 2:
            raise ValueError(f"block must be two positive ints (rows, cols), got {block!r}")
        return Block(*shape)
    elif (match := _NM.match(spec)) is not None:
        return NM(int(match.group(1)), int(match.group(2)))
    raise ValueError(
        f"unknown structure {spec!r}; known structures: {', '.join(available_structures())}"
    )
