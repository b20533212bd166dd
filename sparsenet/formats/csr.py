"""Compressed sparse row (CSR) weights: a torch-like public class and the packed kernel layout.

``CSR`` mirrors torch's CSR tensors (``crow_indices``/``col_indices``/``values``, int32 or int64
indices) and is what users build and inspect. ``PackedCSR`` is the byte-lean layout the native kernels
read and saved files store (the contract with ``csrc/cpu/csr_view.h``):

* ``crow_indices`` int64 ``[rows + 1]``, ``crow_indices[0] == 0``, non-decreasing, last == nnz
* ``col_indices`` uint16 when ``cols <= 65536`` else int32, ``[nnz]``, sorted and unique per row
* ``values`` float32 ``[nnz]``; all three contiguous CPU tensors

Both classes check every invariant on construction with the same vectorised helpers below, and both
refuse non-finite values: a NaN or Inf weight would silently poison every output it touches, so it is
reported where it enters (``from_dense``, ``from_torch``, the constructors, loading a file).

Tensors are held, not copied: treat the objects as immutable.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.float64)
# Largest column count uint16 indices can address: columns 0 .. 65535.
_UINT16_MAX_COLS = 65536


# ---- shared validation (one implementation for CSR and PackedCSR) -------------------------------------

def _check_shape(shape) -> tuple[int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a (rows, cols) pair of ints, got {shape!r}") from None
    if len(dims) != 2:
        raise ValueError(f"shape must have 2 dimensions (rows, cols), got {shape!r}")
    out = []
    for d in dims:
        # bool is an int subclass but never a meaningful size; operator.index accepts numpy/torch ints.
        if isinstance(d, bool):
            raise TypeError(f"shape must hold ints, got {shape!r}")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"shape must hold ints, got {shape!r}") from None
        if d < 0:
            raise ValueError(f"shape must be non-negative, got {tuple(dims)!r}")
        out.append(d)
    return out[0], out[1]


def int_pair(value, what: str, low: int, high: int) -> tuple[int, int]:
    """``value`` as two ints, each in [low, high] (bools and non-integral numbers refused): ValueError
    naming ``what`` otherwise."""
    try:
        pair = tuple(value)
        if len(pair) != 2 or any(isinstance(v, bool) for v in pair):
            raise TypeError
        a, b = (operator.index(v) for v in pair)
    except TypeError:
        raise ValueError(f"{what} must be two ints, got {value!r}") from None
    if not (low <= a <= high and low <= b <= high):
        raise ValueError(f"{what} must be two ints in {low}..{high}, got {value!r}")
    return a, b


def _check_vector(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def _check_same_device(crow, col, values) -> None:
    if not crow.device == col.device == values.device:
        raise ValueError(
            f"crow_indices, col_indices and values must be on one device, got "
            f"{crow.device}, {col.device} and {values.device}"
        )


def _first(mask: torch.Tensor) -> int:
    """Position of the first True in a 1-D bool tensor known to hold one."""
    return int(mask.nonzero()[0, 0].item())


def _check_structure(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> None:
    """Row pointers, column indices and values against each other and the shape.

    ``col`` must be int32 or int64 here (callers widen uint16 first: torch has few uint16 ops).
    """
    nnz = values.numel()
    if col.numel() != nnz:
        raise ValueError(f"col_indices has {col.numel()} entries but values has {nnz}; they must match")
    if crow.numel() != rows + 1:
        raise ValueError(f"crow_indices has {crow.numel()} entries, expected rows + 1 = {rows + 1}")
    first = int(crow[0].item())
    if first != 0:
        raise ValueError(f"crow_indices[0] = {first}, expected 0")
    steps = crow.diff()
    if bool((steps < 0).any()):
        r = _first(steps < 0)
        raise ValueError(
            f"crow_indices must be non-decreasing: crow_indices[{r + 1}] = {int(crow[r + 1])} "
            f"< crow_indices[{r}] = {int(crow[r])}"
        )
    last = int(crow[-1].item())
    if last != nnz:
        raise ValueError(f"crow_indices[-1] = {last} does not match nnz = {nnz} (the length of col_indices and values)")
    if nnz == 0:
        return
    out_of_range = (col < 0) | (col >= cols)
    if bool(out_of_range.any()):
        k = _first(out_of_range)
        raise ValueError(f"col_indices[{k}] = {int(col[k])} is out of range for {cols} columns")
    # A step that does not increase is fine only where a new row starts (positions listed in crow).
    row_start = torch.zeros(nnz + 1, dtype=torch.bool, device=col.device)
    row_start[crow.long()] = True
    not_increasing = (col[1:] <= col[:-1]) & ~row_start[1:nnz]
    if bool(not_increasing.any()):
        k = _first(not_increasing) + 1
        r = int(torch.searchsorted(crow.long(), torch.tensor(k, device=crow.device), right=True).item()) - 1
        raise ValueError(
            f"col_indices of row {r} are not strictly increasing: col_indices[{k}] = {int(col[k])} follows "
            f"col_indices[{k - 1}] = {int(col[k - 1])} (columns must be sorted and unique within a row)"
        )
    _check_finite(values, "values")


def _check_finite(values: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        k = _first(bad.reshape(-1))
        raise ValueError(
            f"{name} holds a non-finite weight ({values.reshape(-1)[k].item()} at flat position {k}); "
            f"sparsenet refuses to store NaN/Inf weights"
        )


def check_stored(kind: str, **tensors: tuple) -> None:
    """Each of a packed format's tensors (``name=(tensor, dtype)``): 1-D, of its dtype, contiguous, on the CPU."""
    for name, (t, dtype) in tensors.items():
        _check_vector(t, name)
        if t.dtype != dtype:
            raise TypeError(f"{kind} {name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{kind} {name} must be on the CPU, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{kind} {name} must be contiguous")


def float32_and_kept(dense, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``from_dense``'s inputs for the packed formats: ``dense`` as a float32 CPU matrix, and the
    entries to keep (its non-zeros, or exactly where the bool ``mask`` is True); a kept NaN/Inf raises."""
    if not isinstance(dense, torch.Tensor) or dense.layout != torch.strided or dense.dim() != 2:
        raise TypeError(f"dense must be a 2-D strided tensor, got "
                        f"{tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__}")
    if not dense.is_floating_point():
        raise TypeError(f"dense must be a floating-point tensor, got {dense.dtype}")
    dense = dense.detach().to(device="cpu", dtype=torch.float32)
    if mask is None:
        keep = dense != 0  # NaN != 0: kept, and refused below
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != dense.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(dense.shape)}")
        keep = mask.detach().cpu()
    _check_finite(dense[keep], "dense")
    return dense, keep


def _density(nnz: int, shape: tuple[int, int]) -> float:
    # An empty shape stores nothing, so it is reported as fully sparse (0.0), never as a ZeroDivision.
    total = shape[0] * shape[1]
    return nnz / total if total else 0.0


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- CSR ------------------------------------------------------------------------------------------

class StoredSizes:
    """Sizes every sparse form reports the same way, from ``values`` and the tensors named in
    ``_STORED`` (all that the form stores)."""

    shape: tuple[int, int]
    _STORED: tuple[str, ...]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        """nnz / (rows * cols); 0.0 for an empty shape (nothing is stored)."""
        return _density(self.nnz, self.shape)

    @property
    def nbytes(self) -> int:
        return _nbytes(*(getattr(self, name) for name in self._STORED))


class _CSRSizes(StoredSizes):
    """Both CSR forms store the same three tensors."""

    _STORED = ("crow_indices", "col_indices", "values")


class CSR(_CSRSizes):
    """A 2-D sparse matrix in CSR form, named and typed like ``torch.sparse_csr_tensor``.

    ``crow_indices`` and ``col_indices`` are int32 or int64 (the same dtype), ``values`` float32 or
    float64, all 1-D on one device. Every invariant is checked here; errors name the tensor and entry.
    """

    __slots__ = ("crow_indices", "col_indices", "values", "shape")

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: Sequence[int]) -> None:
        rows, cols = _check_shape(shape)
        _check_vector(crow_indices, "crow_indices")
        _check_vector(col_indices, "col_indices")
        _check_vector(values, "values")
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if t.dtype not in _INDEX_DTYPES:
                raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if col_indices.dtype != crow_indices.dtype:
            raise TypeError(
                f"col_indices ({col_indices.dtype}) and crow_indices ({crow_indices.dtype}) must share a dtype"
            )
        if values.dtype not in _VALUE_DTYPES:
            raise TypeError(f"values must be float32 or float64, got {values.dtype}")
        _check_same_device(crow_indices, col_indices, values)
        _check_structure(crow_indices, col_indices, values, rows, cols)
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.values = values
        self.shape = (rows, cols)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None) -> "CSR":
        """Keep the non-zeros of ``dense`` or, with a bool ``mask``, exactly the entries where it is True.

        With a mask, a kept entry whose value is 0 is still stored (the mask is the sparsity pattern,
        e.g. of a layer that will be fine-tuned). Input on another device is copied to the CPU;
        float64 stays float64, other floating dtypes become float32. Kept NaN/Inf raise ValueError.
        Indices are int64, torch's default.
        """
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense must be a torch.Tensor, got {type(dense).__name__}")
        if dense.layout != torch.strided:
            raise TypeError(f"dense must be a strided tensor, got layout {dense.layout} (use CSR.from_torch)")
        if dense.dim() != 2:
            raise ValueError(f"dense must be 2-D, got shape {tuple(dense.shape)}")
        if not dense.is_floating_point():
            raise TypeError(f"dense must be a floating-point tensor, got {dense.dtype}")
        dense = dense.detach().cpu()
        if dense.dtype not in _VALUE_DTYPES:
            dense = dense.float()
        if mask is None:
            keep = dense != 0  # NaN != 0, so NaN counts as kept and is refused below
        else:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
            if mask.shape != dense.shape:
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(dense.shape)} like dense")
            keep = mask.detach().cpu()
        values = dense[keep]  # row-major order, i.e. sorted by (row, col)
        _check_finite(values, "dense")
        cols = keep.nonzero()[:, 1].contiguous()
        crow = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(keep.sum(dim=1), dim=0, out=crow[1:])
        return cls(crow, cols, values, tuple(dense.shape))

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> "CSR":
        """From a 2-D ``torch.sparse_csr_tensor`` (no batch or dense dimensions). Copies to the CPU."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.sparse_csr:
            raise TypeError(f"expected a tensor with layout torch.sparse_csr, got {t.layout}")
        if t.dim() != 2:
            raise ValueError(f"expected a 2-D sparse CSR tensor, got {t.dim()}-D")
        t = t.detach().cpu()
        return cls(t.crow_indices(), t.col_indices(), t.values(), tuple(t.shape))

    # ---- conversion ------------------------------------------------------------------------------
    def to_torch(self) -> torch.Tensor:
        # Already validated here, so torch's own (slow) invariant check is skipped explicitly.
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape,
                                       check_invariants=False)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols, dtype=self.values.dtype, device=self.values.device)
        row_of = torch.repeat_interleave(
            torch.arange(rows, device=self.values.device), self.crow_indices.diff().long()
        )
        dense[row_of, self.col_indices.long()] = self.values
        return dense

    def pack(self) -> "PackedCSR":
        return PackedCSR.from_csr(self)

    # ---- properties ------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def index_dtype(self) -> torch.dtype:
        return self.crow_indices.dtype

    def __repr__(self) -> str:
        return (f"CSR(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, dtype={self.dtype}, "
                f"index_dtype={self.index_dtype})")


# ---- PackedCSR ------------------------------------------------------------------------------------

class PackedCSR(_CSRSizes):
    """The layout the native kernels read and files store; see the module docstring for the contract."""

    FORMAT = "csr"
    VERSION = 1
    STRUCTURE = ("crow_indices", "col_indices")

    __slots__ = ("crow_indices", "col_indices", "values", "shape")

    @staticmethod
    def index_dtype_for(cols: int) -> torch.dtype:
        """The column-index dtype of the packed layout: 16 bits whenever they can address every column."""
        return torch.uint16 if cols <= _UINT16_MAX_COLS else torch.int32

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: Sequence[int]) -> None:
        rows, cols = _check_shape(shape)
        _check_vector(crow_indices, "crow_indices")
        _check_vector(col_indices, "col_indices")
        _check_vector(values, "values")
        if crow_indices.dtype != torch.int64:
            raise TypeError(f"packed crow_indices must be int64, got {crow_indices.dtype}")
        want = self.index_dtype_for(cols)
        if col_indices.dtype != want:
            raise TypeError(f"packed col_indices for {cols} columns must be {want}, got {col_indices.dtype}")
        if values.dtype != torch.float32:
            raise TypeError(f"packed values must be float32, got {values.dtype}")
        _check_same_device(crow_indices, col_indices, values)
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices), ("values", values)):
            if t.device.type != "cpu":
                raise ValueError(f"packed {name} must be on the CPU, got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"packed {name} must be contiguous")
        # Widen uint16 for the checks: torch has no comparison kernels for it before 2.6 or so.
        _check_structure(crow_indices, col_indices.to(torch.int32), values, rows, cols)
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.values = values
        self.shape = (rows, cols)

    @classmethod
    def from_csr(cls, csr: CSR) -> "PackedCSR":
        """Pack a CSR: values become float32 (a float64 value beyond float32's range raises ValueError)."""
        if not isinstance(csr, CSR):
            raise TypeError(f"expected a sparsenet.formats.CSR, got {type(csr).__name__}")
        crow = csr.crow_indices.to(device="cpu", dtype=torch.int64).contiguous()
        col = csr.col_indices.to(device="cpu", dtype=cls.index_dtype_for(csr.shape[1])).contiguous()
        values = csr.values.to(device="cpu", dtype=torch.float32).contiguous()
        return cls(crow, col, values, csr.shape)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None) -> "PackedCSR":
        """Shorthand for ``CSR.from_dense(dense, mask).pack()``."""
        return CSR.from_dense(dense, mask).pack()

    @classmethod
    def empty(cls, rows: int, cols: int) -> "PackedCSR":
        """No stored weight: every row empty."""
        return cls(torch.zeros(rows + 1, dtype=torch.int64), torch.empty(0, dtype=cls.index_dtype_for(cols)),
                   torch.empty(0, dtype=torch.float32), (rows, cols))

    @classmethod
    def from_tensors(cls, tensors: dict, shape: Sequence[int]) -> "PackedCSR":
        """From tensors named as :meth:`tensors` names them (a module's buffers, a file's entries)."""
        return cls(tensors["crow_indices"], tensors["col_indices"], tensors["values"], shape)

    def tensors(self) -> dict:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    def to_csr(self) -> CSR:
        """Back to the public form with int64 indices (torch's default; uint16 has almost no torch ops)."""
        return CSR(self.crow_indices, self.col_indices.to(torch.int64), self.values, self.shape)

    def to_dense(self) -> torch.Tensor:
        return self.to_csr().to_dense()

    # ---- properties ------------------------------------------------------------------------------

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col_indices.dtype

    def metadata(self) -> dict:
        """JSON-able description, as stored in saved files."""
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "shape": list(self.shape),
            "nnz": self.nnz,
            "index_dtype": str(self.index_dtype).removeprefix("torch."),
        }

    def __repr__(self) -> str:
        return (f"PackedCSR(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
                f"index_dtype={self.index_dtype}, nbytes={self.nbytes})")
