"""Bitmap-compressed weights: one bit per position, and the stored weights packed row by row.

The layout the native kernels read and saved files store (the contract with
``csrc/cpu/bitmap_view.h``):

* ``masks`` uint16 ``[rows * chunks]``, ``chunks = ceil(cols / 16)``: bit ``j`` of
  ``masks[r * chunks + k]`` is set when ``W[r, 16 k + j]`` is stored; bits past the last column are 0
* ``row_ptr`` int64 ``[rows + 1]``: where row ``r``'s values start; ``row_ptr[0] == 0`` and each
  row's count equals the bits set in its masks
* ``values`` float32 ``[nnz]``, row by row in column order; all three contiguous CPU tensors

Per position an eighth of a byte, plus four bytes per stored weight: at 50% density 2.13 bytes per
position against CSR's 3 (16-bit column indices) and dense's 4. A 16-column chunk decodes in one
instruction on AVX-512 and a table lookup on AVX2. Every invariant is checked on construction;
non-finite values are refused as for CSR. Tensors are held, not copied: treat objects as immutable.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sparsenet.formats.csr import StoredSizes, _check_finite, _check_shape, _first, check_stored, float32_and_kept

CHUNK = 16  # columns per mask word
_BITS = 1 << torch.arange(CHUNK, dtype=torch.int32)


def chunks_for(cols: int) -> int:
    return (cols + CHUNK - 1) // CHUNK


def _unpacked(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, chunks * 16) bool: which positions the masks store (past ``cols`` included)."""
    words = masks.to(torch.int32).reshape(rows, chunks_for(cols), 1)
    return ((words & _BITS) != 0).reshape(rows, chunks_for(cols) * CHUNK)


def stored_positions(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) bool: the positions the masks store."""
    return _unpacked(masks, rows, cols)[:, :cols]


class PackedBitmap(StoredSizes):
    """A 2-D weight in the bitmap layout above, as kernels read it and files store it."""

    FORMAT = "bitmap"
    VERSION = 1
    STRUCTURE = ("masks", "row_ptr")
    _STORED = (*STRUCTURE, "values")

    __slots__ = ("masks", "row_ptr", "values", "shape")

    def __init__(self, masks: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> None:
        rows, cols = _check_shape(shape)
        check_stored("bitmap", masks=(masks, torch.uint16), row_ptr=(row_ptr, torch.int64), values=(values, torch.float32))
        chunks = chunks_for(cols)
        if masks.numel() != rows * chunks:
            raise ValueError(f"masks has {masks.numel()} entries, expected rows * ceil(cols / 16) = {rows * chunks}")
        if row_ptr.numel() != rows + 1:
            raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected rows + 1 = {rows + 1}")
        if int(row_ptr[0]) != 0:
            raise ValueError(f"row_ptr[0] = {int(row_ptr[0])}, expected 0")
        keep = _unpacked(masks, rows, cols)
        if bool(keep[:, cols:].any()):
            r = _first(keep[:, cols:].any(dim=1))
            raise ValueError(f"row {r} of masks has bits set past the last column ({cols})")
        counts = keep.sum(dim=1)
        wrong = row_ptr.diff() != counts
        if bool(wrong.any()):
            r = _first(wrong)
            raise ValueError(f"row {r} stores {int(counts[r])} weights by its masks, but row_ptr gives it "
                             f"{int(row_ptr[r + 1] - row_ptr[r])}")
        if int(row_ptr[-1]) != values.numel():
            raise ValueError(f"row_ptr[-1] = {int(row_ptr[-1])} does not match the {values.numel()} values")
        _check_finite(values, "values")
        self.masks, self.row_ptr, self.values, self.shape = masks, row_ptr, values, (rows, cols)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None) -> "PackedBitmap":
        """Keep the non-zeros of ``dense`` or, with a bool ``mask``, exactly the entries where it is
        True (a kept zero is still stored). Copied to the CPU as float32; kept NaN/Inf raise."""
        dense, keep = float32_and_kept(dense, mask)
        rows, cols = dense.shape
        values = dense[keep].contiguous()
        padded = torch.zeros(rows, chunks_for(cols) * CHUNK, dtype=torch.int32)
        padded[:, :cols] = keep
        masks = (padded.reshape(rows, chunks_for(cols), CHUNK) * _BITS).sum(dim=-1, dtype=torch.int32).to(torch.uint16).reshape(-1)
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(keep.sum(dim=1), dim=0, out=row_ptr[1:])
        return cls(masks.contiguous(), row_ptr, values, (rows, cols))

    @classmethod
    def empty(cls, rows: int, cols: int) -> "PackedBitmap":
        """No stored weight: every mask word 0."""
        return cls(torch.zeros(rows * chunks_for(cols), dtype=torch.uint16), torch.zeros(rows + 1, dtype=torch.int64),
                   torch.empty(0, dtype=torch.float32), (rows, cols))

    @classmethod
    def from_tensors(cls, tensors: dict, shape: Sequence[int]) -> "PackedBitmap":
        """From tensors named as :meth:`tensors` names them (a module's buffers, a file's entries)."""
        return cls(tensors["masks"], tensors["row_ptr"], tensors["values"], shape)

    def tensors(self) -> dict:
        return {"masks": self.masks, "row_ptr": self.row_ptr, "values": self.values}

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols, dtype=torch.float32)
        dense[stored_positions(self.masks, rows, cols)] = self.values
        return dense

    def metadata(self) -> dict:
        """JSON-able description, as stored in saved files."""
        return {"format": self.FORMAT, "version": self.VERSION, "shape": list(self.shape), "nnz": self.nnz}

    def __repr__(self) -> str:
        return (f"PackedBitmap(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
                f"nbytes={self.nbytes})")
