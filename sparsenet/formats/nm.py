"""N:M weights: in every group of M consecutive columns of a row, N stored slots, each with its
column within the group in a few bits.

The layout the native kernels read and saved files store (the contract with ``csrc/cpu/nm_view.h``):

* ``pattern`` int64 ``[2]``: ``(n, m)``, ``1 <= n < m <= 16``; a row has ``ceil(cols / m)`` groups, the
  last one partial where ``m`` does not divide ``cols`` (it must still have at least ``n`` columns)
* ``indices`` uint8 ``[rows * row_bytes]``: slot ``s`` of a row (``s = group * n + k``) keeps its column
  within the group in ``bits`` bits (2 when ``m <= 4``, else 4) at bit ``s * bits`` of the row's bytes,
  least significant first; ``row_bytes = ceil(groups * n * bits / 8)``. Within a group the columns are
  strictly increasing; a group keeping fewer than ``n`` weights fills its spare slots with zeros at
  unused columns
* ``values`` float32 ``[rows * groups * n]``, slot after slot

The format for weights pruned with ``structure="N:M"``: 2:4 reads 4.25 bytes per stored weight (2.13
per position) against CSR's 6 and dense's 4 per position. Every invariant is checked on construction;
non-finite values are refused. Tensors are held, not copied.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparsenet.formats.csr import StoredSizes, _check_finite, _check_shape, _first, check_stored, float32_and_kept, int_pair

MAX_M = 16
_GROUP_SIZES = (2, 4, 8, 16)  # what from_dense tries when given no pattern
TIGHT = 0.75  # least share of the slots a detected pattern's kept entries fill


def index_bits(m: int) -> int:
    return 2 if m <= 4 else 4


def _check_pattern(pattern) -> tuple[int, int]:
    n, m = int_pair(pattern, "pattern", 1, MAX_M)  # (n, m)
    if n >= m:
        raise ValueError(f"pattern must be (n, m) with 1 <= n < m <= {MAX_M}, got {pattern!r}")
    return n, m


def _check_last_group(cols: int, n: int, m: int) -> None:
    if 0 < cols % m < n:
        raise ValueError(f"{n}:{m} needs every group to have at least {n} columns, but the last of a row of {cols} "
                         f"has {cols % m}")


def _groups(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(rows, groups, m) view of ``keep`` padded with False past its last column."""
    rows, cols = keep.shape
    return F.pad(keep, (0, -(-cols // m) * m - cols)).reshape(rows, -(-cols // m), m)


def detect_pattern(keep: torch.Tensor) -> Optional[tuple[int, int]]:
    """The N:M pattern (M in 2, 4, 8, 16, N at most M / 2) the bool matrix ``keep`` follows with the
    fewest bytes, or None: every group of M columns then keeps at most N, and the kept entries fill at
    least :data:`TIGHT` of the slots (a random 70%-sparse matrix keeps at most 8 of most 16 columns,
    but stored as 8:16 its slots would be mostly padding)."""
    keep = keep.detach().to(device="cpu", dtype=torch.bool)
    if keep.dim() != 2:
        raise ValueError(f"keep must be 2-D, got shape {tuple(keep.shape)}")
    best, best_bytes = None, None
    rows, cols = keep.shape
    kept = int(keep.sum())
    for m in _GROUP_SIZES:
        if cols < m:
            continue
        n = max(1, int(_kept_per_group(keep, m).max())) if keep.numel() else 1
        if n > m // 2 or 0 < cols % m < n or kept < TIGHT * rows * -(-cols // m) * n:
            continue
        per_position = n / m * (4 + index_bits(m) / 8)
        if best_bytes is None or per_position < best_bytes:
            best, best_bytes = (n, m), per_position
    return best


def _kept_per_group(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(rows, groups) uint8: how many entries each group keeps (summed as bytes: ten times faster than
    a bool sum, which widens to int64)."""
    return _groups(keep, m).view(torch.uint8).sum(-1, dtype=torch.uint8)


def _pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, slots) ints below 2**bits -> (rows, row_bytes) uint8, least significant first."""
    rows, slots = fields.shape
    per_byte = 8 // bits
    padded = F.pad(fields.to(torch.int32), (0, -(-slots // per_byte) * per_byte - slots))
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (padded.reshape(rows, padded.shape[1] // per_byte, per_byte) << shifts).sum(-1).to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, rows: int, slots: int, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    row_bytes = -(-slots * bits // 8)
    fields = (packed.reshape(rows, row_bytes, 1).to(torch.int32) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(rows, row_bytes * per_byte)[:, :slots]


class PackedNM(StoredSizes):
    """A 2-D weight in the N:M layout above, as kernels read it and files store it. ``nnz`` counts
    every slot, the zeros of groups that keep fewer than N included."""

    FORMAT = "nm"
    VERSION = 1
    STRUCTURE = ("pattern", "indices")
    _STORED = (*STRUCTURE, "values")

    __slots__ = ("pattern", "indices", "values", "shape")

    def __init__(self, pattern: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 shape: Sequence[int]) -> None:
        rows, cols = _check_shape(shape)
        check_stored("N:M", pattern=(pattern, torch.int64), indices=(indices, torch.uint8), values=(values, torch.float32))
        if pattern.numel() != 2:
            raise ValueError(f"pattern must hold 2 entries (n, m), got {pattern.numel()}")
        n, m = _check_pattern(pattern.tolist())
        groups, bits = -(-cols // m), index_bits(m)
        _check_last_group(cols, n, m)
        row_bytes = -(-groups * n * bits // 8)
        if indices.numel() != rows * row_bytes:
            raise ValueError(f"indices has {indices.numel()} bytes, expected rows x {row_bytes} = {rows * row_bytes}")
        if values.numel() != rows * groups * n:
            raise ValueError(f"values has {values.numel()} entries, expected rows x groups x n = {rows * groups * n}")
        if rows and groups:
            within = _unpack_fields(indices, rows, groups * n, bits).reshape(rows, groups, n)
            widths = (cols - torch.arange(groups) * m).clamp(max=m).view(1, groups, 1)
            outside = (within >= widths).flatten()
            if bool(outside.any()):
                k = _first(outside)
                raise ValueError(f"slot {k % (groups * n)} of row {k // (groups * n)} has column {int(within.flatten()[k])} "
                                 f"within its group, outside the group's columns")
            unsorted = (within[..., 1:] <= within[..., :-1]).flatten()
            if bool(unsorted.any()):
                k = _first(unsorted)
                raise ValueError(f"row {k // (groups * (n - 1))}: a group's indices must be strictly increasing")
        _check_finite(values, "values")
        self.pattern, self.indices, self.values, self.shape = pattern, indices, values, (rows, cols)

    @property
    def nm(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.pattern)

    def columns(self) -> torch.Tensor:
        """(rows, slots) int64: the column of every slot."""
        rows, cols = self.shape
        n, m = self.nm
        groups = -(-cols // m)
        within = _unpack_fields(self.indices, rows, groups * n, index_bits(m)).long()
        return within + (torch.arange(groups * n) // n * m).view(1, -1)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None,
                   pattern: Sequence[int] | None = None) -> "PackedNM":
        """Keep the non-zeros of ``dense`` or, with a bool ``mask``, exactly the entries where it is True.
        Without ``pattern``, the one the kept entries follow (:func:`detect_pattern`); ValueError when a
        group keeps more than N. Float32 on the CPU; NaN/Inf refused."""
        dense, keep = float32_and_kept(dense, mask)
        if pattern is None:
            pattern = detect_pattern(keep)
            if pattern is None:
                raise ValueError("the weight's kept entries follow no N:M pattern (groups of 2, 4, 8 or 16 columns "
                                 "keeping at most half): prune with structure='2:4' (or another N:M), or pass "
                                 "pattern=(n, m)")
        n, m = _check_pattern(pattern)
        rows, cols = dense.shape
        _check_last_group(cols, n, m)
        groups = _groups(keep, m)  # (rows, G, m)
        counts = _kept_per_group(keep, m)
        if rows and bool((counts > n).any()):
            r, g = divmod(_first((counts > n).flatten()), counts.shape[1])
            raise ValueError(f"row {r}, columns {g * m}..{min(cols, g * m + m) - 1} keep {int(counts[r, g])} weights: "
                             f"more than {n} of {m}, so the weight is not {n}:{m}")
        # Each group's slots: its kept columns first (in order), then unused columns of the group for
        # the spare slots (stored as 0), all sorted. Columns past the edge rank last and are never chosen.
        width = (cols - torch.arange(groups.shape[1]) * m).clamp(max=m)
        exists = torch.arange(m).view(1, 1, m) < width.view(1, -1, 1)
        rank = (~groups).to(torch.int32) * 2 * m + (~exists).to(torch.int32) * 4 * m + torch.arange(m, dtype=torch.int32)
        chosen = rank.argsort(dim=-1)[..., :n].sort(dim=-1).values  # (rows, G, n) columns within groups
        padded = F.pad(torch.where(keep, dense, 0.0), (0, groups.shape[1] * m - cols)).reshape(groups.shape)
        values = padded.gather(-1, chosen).reshape(-1).contiguous()
        indices = _pack_fields(chosen.reshape(rows, groups.shape[1] * n), index_bits(m)).reshape(-1).contiguous()
        return cls(torch.tensor([n, m], dtype=torch.int64), indices, values, (rows, cols))

    @classmethod
    def empty(cls, rows: int, cols: int, pattern: Sequence[int] | None = None) -> "PackedNM":
        """Every slot a zero (at the first columns of its group); by default 2:4, or 1:2 where a row's
        last group would be too short for 2:4."""
        if pattern is None:
            pattern = (1, 2) if 0 < cols % 4 < 2 else (2, 4)
        return cls.from_dense(torch.zeros(rows, cols), pattern=pattern)

    @classmethod
    def from_tensors(cls, tensors: dict, shape: Sequence[int]) -> "PackedNM":
        return cls(tensors["pattern"], tensors["indices"], tensors["values"], shape)

    @classmethod
    def fits(cls, keep: torch.Tensor) -> bool:
        """Whether ``format="auto"`` should time this format: only where the kept entries follow an
        N:M pattern."""
        return detect_pattern(keep) is not None

    def tensors(self) -> dict:
        return {"pattern": self.pattern, "indices": self.indices, "values": self.values}

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        n, m = self.nm
        dense = torch.zeros(rows, -(-cols // m) * m, dtype=torch.float32)
        dense.scatter_(1, self.columns(), self.values.reshape(rows, -(-cols // m) * n))
        return dense[:, :cols].contiguous()

    def metadata(self) -> dict:
        n, m = self.nm
        return {"format": self.FORMAT, "version": self.VERSION, "shape": list(self.shape), "nnz": self.nnz,
                "pattern": f"{n}:{m}"}

    def __repr__(self) -> str:
        n, m = self.nm
        return f"PackedNM(shape={self.shape}, pattern={n}:{m}, nnz={self.nnz}, nbytes={self.nbytes})"
