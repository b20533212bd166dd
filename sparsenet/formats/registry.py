"""The registry of sparse weight formats: what ``SparseLinear``, ``sparsify``, ``io`` and the CLI
know formats by.

A format is a packed class (``PackedCSR``, ``PackedBitmap``) with a common protocol:

* ``FORMAT`` (its name, the tag saved files carry) and ``VERSION`` (of its layout);
* ``STRUCTURE``: the names of its structure tensors (the module's buffers), besides ``values`` (the
  stored weights, float32, the module's Parameter);
* ``from_dense(dense, mask=None)``, ``empty(rows, cols)``, ``from_tensors(tensors, shape)`` (validated),
  ``tensors()`` (structure and values by name), ``to_dense()``, ``nnz``, ``nbytes``, ``metadata()``.

A format may also have ``fits(keep)``: whether ``format="auto"`` should consider it for a weight that
keeps the entries of the bool matrix ``keep`` (BSR only for block-structured ones, N:M for N:M ones); without it, always.

Adding a format means writing its module, its kernels and its op, and one ``register`` call.
"""
from __future__ import annotations

import torch

from sparsenet.formats.bitmap import PackedBitmap
from sparsenet.formats.bsr import PackedBSR
from sparsenet.formats.nm import PackedNM
from sparsenet.formats.csr import PackedCSR

_FORMATS: dict[str, type] = {}


def packable(tensors: dict) -> dict:
    """A layer's format tensors (structure and ``values`` by name) as the packed classes take them:
    on the CPU, values float32. (A layer may hold them on CUDA and its values in float16 or bfloat16,
    for the CUDA kernels; the packed classes validate and describe the CPU float32 form.)"""
    half = (torch.float16, torch.bfloat16)  # (any other dtype is left for the format to refuse)
    return {name: t.detach().to("cpu", torch.float32) if name == "values" and t.dtype in half else t.detach().cpu()
            for name, t in tensors.items()}


def register(packed: type) -> type:
    """Make ``packed`` (a class following the protocol above) known under its ``FORMAT`` name."""
    for attr in ("FORMAT", "VERSION", "STRUCTURE", "from_dense", "empty", "from_tensors", "tensors", "to_dense",
                 "metadata"):
        if not hasattr(packed, attr):
            raise TypeError(f"{packed.__name__} lacks {attr!r}, which every registered format has")
    _FORMATS[packed.FORMAT] = packed
    return packed


def get(name: str) -> type:
    """The packed class of format ``name``; ValueError naming the known formats otherwise."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sparse format {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_FORMATS)


def fitting(keep) -> list[str]:
    """The formats worth timing for a weight that keeps the entries of the bool matrix ``keep``."""
    return [name for name in names() if not hasattr(_FORMATS[name], "fits") or _FORMATS[name].fits(keep)]


register(PackedCSR)
register(PackedBitmap)
register(PackedBSR)
register(PackedNM)
