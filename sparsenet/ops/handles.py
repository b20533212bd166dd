"""Validated native handles for sparse weights (packed CSR, bitmap, BSR, N:M), built once per weight and reused on every call.

The native handle (``sparsenet._C.CsrHandle``) copies the packed structure (row pointers and column
indices) when it is built, validates the copy (monotone row pointers, sorted in-range column indices)
and from then on reads only that copy, so no later write to the tensors, tracked by torch or not,
can make a kernel read or write out of bounds. The values are handed over on every call.

What a handle derives from the tensors (its copy of the structure, and the column-tiled copy of the
weight it builds for large batches, values included) is valid only for the tensors as they were. So
a cached handle is reused only while

* the three tensors it was built from are still alive (weak references), and
* none of them was modified in place since (torch's version counters, which views share).

Anything else builds (and so validates) a new handle. Writes torch does not track (through
``.data``, ``.numpy()`` or DLPack) may therefore go unseen until the next tracked change, but they
can never make a kernel read or write out of bounds.
"""
from __future__ import annotations

import weakref

import torch

from sparsenet import _C
from sparsenet.formats import registry

_Key = tuple
_cache: dict[_Key, tuple] = {}


def _evict(key: _Key) -> None:
    _cache.pop(key, None)


def check_packed(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> None:
    """What the native CSR handle needs of the tensors themselves: CPU, contiguous, float32 values."""
    _check_tensors(crow_indices=crow, col_indices=col, values=values)


def _check_tensors(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if tensors["values"].dtype != torch.float32:
        raise TypeError(f"values must be float32, got {tensors['values'].dtype}")


def csr_handle(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int) -> _C.CsrHandle:
    """The native handle for this packed CSR weight, validated once and cached.

    Inference tensors (made under ``torch.inference_mode``) carry no version counter, so an in-place
    change could not be noticed: their handles are rebuilt, and so re-validated, on every call.
    ``SparseLinear`` always makes normal tensors, even when built under inference mode.
    """
    # Checked before the cache is consulted: a strided view starting where a cached tensor starts
    # must be refused, not mistaken for it.
    check_packed(crow, col, values)
    return cached("csr", (crow, col, values), in_features, lambda: _validated(crow, col, values, in_features))


def bitmap_handle(masks: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, in_features: int) -> _C.BitmapHandle:
    """The native handle for this bitmap weight (``sparsenet.formats.PackedBitmap``'s layout),
    validated once and cached exactly as :func:`csr_handle`'s."""
    _check_tensors(masks=masks, row_ptr=row_ptr, values=values)
    return cached("bitmap", (masks, row_ptr, values), in_features, lambda: _C.BitmapHandle(
        row_ptr.numel() - 1, in_features, masks.detach().numpy(), row_ptr.detach().numpy(), values.detach().numpy()))


def cached(kind: str, tensors: tuple, in_features, build):
    """A handle built by ``build()`` from ``tensors``, reused while they are alive and unmodified."""
    if any(t.is_inference() for t in tensors):
        return build()
    key = (kind, *(t.data_ptr() for t in tensors), *(t.numel() for t in tensors), *(t.dtype for t in tensors),
           in_features)
    entry = _cache.get(key)
    if entry is not None:
        refs, versions, handle = entry
        if all(ref() is t for ref, t in zip(refs, tensors)) and versions == _versions(*tensors):
            return handle
    handle = build()
    evict = lambda _ref, key=key: _evict(key)  # noqa: E731  (any of them dying drops the entry)
    _cache[key] = (tuple(weakref.ref(t, evict) for t in tensors), _versions(*tensors), handle)
    return handle


def _versions(*tensors) -> tuple:
    return tuple(t._version for t in tensors)


# Each format's native handle class in sparsenet._C: built as Handle(rows, cols, *structure, values, keep, bias).
_NATIVE = {"csr": "CsrHandle", "bitmap": "BitmapHandle", "bsr": "BsrHandle", "nm": "NmHandle"}


def _native_class(format: str, structure: tuple, values: torch.Tensor):
    """``format``'s handle class, once its tensors are checked (CPU, contiguous, float32 values)."""
    _check_tensors(**dict(zip(registry.get(format).STRUCTURE, structure)), values=values)
    return getattr(_C, _NATIVE[format])


def native_handle(format: str, structure: tuple, values: torch.Tensor, in_features: int, out_features: int):
    """The native handle for a ``format`` weight (its structure tensors in the format's order, and
    values), validated once and cached exactly as :func:`csr_handle`'s."""
    tensors = (*structure, values)
    native = _native_class(format, structure, values)
    return cached(format, tensors, (in_features, out_features),
                   lambda: native(out_features, in_features, *(t.detach().numpy() for t in tensors)))


def owning_handle(format: str, structure: tuple, values, in_features: int, out_features: int, bias=None):
    """A handle for a ``format`` weight (its structure tensors, in the format's order, and values)
    that keeps the values (and the bias) alive itself (``keep=True``): not cached here, it belongs to
    whoever holds the tensors (``SparseLinear``'s prepared path) and dies with it."""
    if bias is not None:
        if bias.dtype != torch.float32:
            raise TypeError(f"bias must be float32, got {bias.dtype}")
        if bias.device.type != "cpu" or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous CPU tensor, got one on {bias.device}")
    bias_np = None if bias is None else bias.detach().numpy()
    native = _native_class(format, structure, values)
    return native(out_features, in_features, *(t.detach().numpy() for t in structure), values.detach().numpy(), True,
                  bias_np)


def _validated(crow, col, values, in_features, keep: bool = False, bias=None) -> _C.CsrHandle:
    return _C.CsrHandle(
        crow.numel() - 1, in_features, crow.detach().numpy(), col.detach().numpy(), values.detach().numpy(), keep,
        bias,
    )


def cached_handles() -> int:
    """Number of live cached handles (for tests and diagnostics)."""
    return len(_cache)
