"""Block-sparse (BSR) weights: whole r x c blocks stored densely, one index per block.

The layout the native kernels read and saved files store (the contract with ``csrc/cpu/bsr_view.h``):

* ``block_shape`` int64 ``[2]``: ``(r, c)``, each 1..64
* ``block_ptr`` int64 ``[ceil(rows / r) + 1]``: where each block row's blocks start; 0 first,
  non-decreasing, ``nnzb`` last
* ``block_cols`` int32 ``[nnzb]``: each stored block's block column, strictly increasing within a
  block row, below ``ceil(cols / c)``
* ``values`` float32 ``[nnzb * r * c]``: block after block, each ``r x c`` row-major. Where ``r`` or
  ``c`` does not divide the weight, the last block row / column is partial: its entries past the
  edge are stored (as 0) and never read.

The format for weights pruned in blocks (``prune(..., structure="block")``): one 4-byte index per
block, and each stored block multiplied densely by register-blocked kernels. ``from_dense`` without
a block shape finds the largest one the weight's mask is made of. Every invariant is checked on
construction; non-finite values are refused as for CSR. Tensors are held, not copied.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparsenet.formats.csr import StoredSizes, _check_finite, _check_shape, _first, check_stored, float32_and_kept, int_pair

MAX_BLOCK = 64
DEFAULT_BLOCK = (16, 16)  # what prune(structure="block") uses by default
# Block shapes from_dense tries when given none, largest first (wider first at equal size: the
# kernels vectorise along a block's columns).
_SIDES = (32, 16, 8, 4, 2, 1)
CANDIDATE_BLOCKS = tuple(sorted(((r, c) for r in _SIDES for c in _SIDES if r * c >= 4),
                                key=lambda rc: (-rc[0] * rc[1], -rc[1])))
_SMALLEST = ((4, 1), (2, 2), (1, 4))


def _blocks(rows: int, r: int) -> int:
    return -(-rows // r)


def _check_block(block) -> tuple[int, int]:
    return int_pair(block, "block", 1, MAX_BLOCK)  # (r, c)


def _tiles(keep: torch.Tensor, r: int, c: int, pad: bool) -> torch.Tensor:
    """(block_rows, block_cols, r * c) view of ``keep`` padded with ``pad`` past its edges."""
    rows, cols = keep.shape
    padded = F.pad(keep, (0, _blocks(cols, c) * c - cols, 0, _blocks(rows, r) * r - rows), value=pad)
    return padded.reshape(_blocks(rows, r), r, _blocks(cols, c), c).transpose(1, 2).reshape(
        _blocks(rows, r), _blocks(cols, c), r * c)


def is_made_of_blocks(keep: torch.Tensor, block: Sequence[int]) -> bool:
    """Whether every ``r x c`` block of the bool matrix ``keep`` is kept or dropped whole (partial
    blocks at the edges judged on the entries they have)."""
    r, c = _check_block(block)
    return bool((_tiles(keep, r, c, pad=False).any(-1) == _tiles(keep, r, c, pad=True).all(-1)).all())


def detect_block(keep: torch.Tensor) -> Optional[tuple[int, int]]:
    """The largest candidate block shape (:data:`CANDIDATE_BLOCKS`, at least 4 entries, none larger
    than the matrix) that the bool matrix ``keep`` is made of, or None: an unstructured mask fits none."""
    keep = keep.detach().to(device="cpu", dtype=torch.bool)
    if keep.dim() != 2:
        raise ValueError(f"keep must be 2-D, got shape {tuple(keep.shape)}")
    rows, cols = keep.shape

    def fits(block) -> bool:  # no block larger than the weight: there a few blocks pass for one big one
        return block[0] <= max(rows, 1) and block[1] <= max(cols, 1) and is_made_of_blocks(keep, block)

    # The candidates' sides are powers of two, so a mask made of r x c blocks is also made of every
    # r' x c' with r' | r and c' | c: one made of none of the smallest (4 x 1, 2 x 2, 1 x 4) is made of
    # no candidate (three checks, not 36, for the unstructured masks most weights have).
    if not any(fits(block) for block in _SMALLEST):
        return None
    return next((block for block in CANDIDATE_BLOCKS if fits(block)), None)


class PackedBSR(StoredSizes):
    """A 2-D weight in the BSR layout above, as kernels read it and files store it. ``nnz`` counts
    every stored entry, the zeros inside stored blocks included."""

    FORMAT = "bsr"
    VERSION = 1
    STRUCTURE = ("block_shape", "block_ptr", "block_cols")
    _STORED = (*STRUCTURE, "values")

    __slots__ = ("block_shape", "block_ptr", "block_cols", "values", "shape")

    def __init__(self, block_shape: torch.Tensor, block_ptr: torch.Tensor, block_cols: torch.Tensor,
                 values: torch.Tensor, shape: Sequence[int]) -> None:
        rows, cols = _check_shape(shape)
        check_stored("bsr", block_shape=(block_shape, torch.int64), block_ptr=(block_ptr, torch.int64),
                     block_cols=(block_cols, torch.int32), values=(values, torch.float32))
        if block_shape.numel() != 2:
            raise ValueError(f"block_shape must hold 2 entries (r, c), got {block_shape.numel()}")
        r, c = _check_block(block_shape.tolist())
        nnzb = block_cols.numel()
        if block_ptr.numel() != _blocks(rows, r) + 1:
            raise ValueError(f"block_ptr has {block_ptr.numel()} entries, expected ceil(rows / r) + 1 = "
                             f"{_blocks(rows, r) + 1}")
        if int(block_ptr[0]) != 0:
            raise ValueError(f"block_ptr[0] = {int(block_ptr[0])}, expected 0")
        steps = block_ptr.diff()
        if bool((steps < 0).any()):
            raise ValueError(f"block_ptr must be non-decreasing (block row {_first(steps < 0)})")
        if int(block_ptr[-1]) != nnzb:
            raise ValueError(f"block_ptr[-1] = {int(block_ptr[-1])} does not match the {nnzb} block_cols")
        if values.numel() != nnzb * r * c:
            raise ValueError(f"values has {values.numel()} entries, expected {nnzb} blocks x {r * c}")
        if nnzb:
            bad = (block_cols < 0) | (block_cols >= _blocks(cols, c))
            if bool(bad.any()):
                k = _first(bad)
                raise ValueError(f"block_cols[{k}] = {int(block_cols[k])} is outside [0, {_blocks(cols, c)})")
            starts = torch.zeros(nnzb + 1, dtype=torch.bool)
            starts[block_ptr] = True
            unsorted = (block_cols[1:] <= block_cols[:-1]) & ~starts[1:nnzb]
            if bool(unsorted.any()):
                k = _first(unsorted) + 1
                raise ValueError(f"block_cols must be strictly increasing within a block row: block_cols[{k}] = "
                                 f"{int(block_cols[k])} follows {int(block_cols[k - 1])}")
        _check_finite(values, "values")
        self.block_shape, self.block_ptr, self.block_cols, self.values = block_shape, block_ptr, block_cols, values
        self.shape = (rows, cols)

    @property
    def block(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.block_shape)

    @property
    def nnz(self) -> int:
        """Stored entries inside the weight (zeros of stored blocks included, padding past the edges not)."""
        rows, cols = self.shape
        r, c = self.block
        heights = (rows - torch.arange(self.block_ptr.numel() - 1) * r).clamp(max=r)
        widths = (cols - self.block_cols.long() * c).clamp(max=c)
        return int((torch.repeat_interleave(heights, self.block_ptr.diff()) * widths).sum())

    @property
    def nnzb(self) -> int:
        return self.block_cols.numel()

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None,
                   block: Sequence[int] | None = None) -> "PackedBSR":
        """Store every ``r x c`` block of ``dense`` that holds a kept entry (its non-zeros or, with a bool
        ``mask``, the entries where it is True), densely: entries of a stored block that are not kept
        are stored as 0. Without ``block``, the largest shape the kept entries are made of
        (:func:`detect_block`); ValueError when there is none. Float32 on the CPU; NaN/Inf refused."""
        dense, keep = float32_and_kept(dense, mask)
        if block is None:
            block = detect_block(keep)
            if block is None:
                raise ValueError("the weight's kept entries are not made of blocks (no block shape of "
                                 f"{', '.join(f'{r}x{c}' for r, c in CANDIDATE_BLOCKS[:4])}, ... fits): "
                                 "prune with structure='block', or pass block=(r, c) to store whole blocks anyway")
        r, c = _check_block(block)
        rows, cols = dense.shape
        stored = _tiles(keep, r, c, pad=False).any(-1)  # (block_rows, block_cols)
        tiles = _tiles(torch.where(keep, dense, 0.0), r, c, pad=0.0)
        block_ptr = torch.zeros(_blocks(rows, r) + 1, dtype=torch.int64)
        torch.cumsum(stored.sum(dim=1), dim=0, out=block_ptr[1:])
        block_cols = stored.nonzero()[:, 1].to(torch.int32).contiguous()
        values = tiles[stored].reshape(-1).contiguous()
        return cls(torch.tensor([r, c], dtype=torch.int64), block_ptr, block_cols, values, (rows, cols))

    @classmethod
    def empty(cls, rows: int, cols: int, block: Sequence[int] = DEFAULT_BLOCK) -> "PackedBSR":
        r, c = _check_block(block)
        return cls(torch.tensor([r, c], dtype=torch.int64), torch.zeros(_blocks(rows, r) + 1, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float32), (rows, cols))

    @classmethod
    def from_tensors(cls, tensors: dict, shape: Sequence[int]) -> "PackedBSR":
        return cls(tensors["block_shape"], tensors["block_ptr"], tensors["block_cols"], tensors["values"], shape)

    @classmethod
    def fits(cls, keep: torch.Tensor) -> bool:
        """Whether ``format="auto"`` should time this format for a weight keeping ``keep``: only when the
        kept entries are made of blocks (stored otherwise, blocks would carry many zeros)."""
        return detect_block(keep) is not None

    def tensors(self) -> dict:
        return {"block_shape": self.block_shape, "block_ptr": self.block_ptr, "block_cols": self.block_cols,
                "values": self.values}

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        r, c = self.block
        grid = torch.zeros(_blocks(rows, r), _blocks(cols, c), r, c, dtype=torch.float32)
        block_rows = torch.repeat_interleave(torch.arange(_blocks(rows, r)), self.block_ptr.diff())
        grid[block_rows, self.block_cols.long()] = self.values.reshape(-1, r, c)
        return grid.transpose(1, 2).reshape(_blocks(rows, r) * r, _blocks(cols, c) * c)[:rows, :cols].contiguous()

    def metadata(self) -> dict:
        return {"format": self.FORMAT, "version": self.VERSION, "shape": list(self.shape), "nnz": self.nnz,
                "block": list(self.block)}

    def __repr__(self) -> str:
        r, c = self.block
        return (f"PackedBSR(shape={self.shape}, block={r}x{c}, blocks={self.nnzb}, density={self.density:.4f}, "
                f"nbytes={self.nbytes})")
