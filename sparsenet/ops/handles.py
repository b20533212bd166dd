"""Validated native handles for packed CSR weights, built once per weight and reused on every call.

The native handle (``sparsenet._C.CsrHandle``) is a *view*: C++ validates the packed buffers once
(sizes, monotone row pointers, sorted in-range column indices), and each call hands it the same
buffers again, which it checks are the ones it validated. It holds no reference to them, so this
cache never keeps a weight alive. A handle is reused only while

* the three tensors it was built from are still alive (weak references), so their memory cannot have
  been freed and reused, and
* the structure tensors were not modified in place since (torch's version counters, which views
  share), so the validated invariants still hold.

Anything else rebuilds (and so re-validates) the handle. Changing ``values`` in place is harmless to
memory safety and needs no rebuild.
"""
from __future__ import annotations

import weakref

import torch

from sparsenet import _C

_Key = tuple
_cache: dict[_Key, tuple] = {}


def _evict(key: _Key) -> None:
    _cache.pop(key, None)


def csr_handle(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int) -> _C.CsrHandle:
    """The native handle for this packed CSR weight, validated once and cached.

    Inference tensors (made under ``torch.inference_mode``) carry no version counter, so an in-place
    change could not be noticed: their handles are rebuilt, and so re-validated, on every call.
    ``SparseLinear`` always makes normal tensors, even when built under inference mode.
    """
    if crow.is_inference() or col.is_inference():
        return _validated(crow, col, values, in_features)
    key = (crow.data_ptr(), col.data_ptr(), values.data_ptr(), crow.numel(), values.numel(), col.dtype, in_features)
    entry = _cache.get(key)
    if entry is not None:
        crow_ref, col_ref, values_ref, crow_version, col_version, handle = entry
        if (
            crow_ref() is not None
            and col_ref() is not None
            and values_ref() is not None
            and crow._version == crow_version
            and col._version == col_version
        ):
            return handle
    return _build(key, crow, col, values, in_features)


def owning_handle(crow, col, values, in_features: int, bias=None) -> _C.CsrHandle:
    """A handle that keeps the buffers (and the bias) alive itself (``keep=True``): not cached here,
    it belongs to whoever holds the tensors (``SparseLinear``'s prepared path) and dies with it."""
    if bias is not None:
        if bias.dtype != torch.float32:
            raise TypeError(f"bias must be float32, got {bias.dtype}")
        if bias.device.type != "cpu" or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous CPU tensor, got one on {bias.device}")
    return _validated(crow, col, values, in_features, keep=True,
                      bias=None if bias is None else bias.detach().numpy())


def _validated(crow, col, values, in_features, keep: bool = False, bias=None) -> _C.CsrHandle:
    for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32, got {values.dtype}")
    return _C.CsrHandle(
        crow.numel() - 1, in_features, crow.detach().numpy(), col.detach().numpy(), values.detach().numpy(), keep,
        bias,
    )


def _build(key: _Key, crow, col, values, in_features) -> _C.CsrHandle:
    handle = _validated(crow, col, values, in_features)
    evict = lambda _ref, key=key: _evict(key)  # noqa: E731  (any of the three dying drops the entry)
    _cache[key] = (
        weakref.ref(crow, evict),
        weakref.ref(col, evict),
        weakref.ref(values, evict),
        crow._version,
        col._version,
        handle,
    )
    return handle


def cached_handles() -> int:
    """Number of live cached handles (for tests and diagnostics)."""
    return len(_cache)
