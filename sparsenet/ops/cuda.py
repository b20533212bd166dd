"""The CUDA backend: the kernels of ``sparsenet._C_cuda`` registered for the sparse ops' CUDA dispatch
key, so a sparse module moved with ``.to("cuda")`` runs them through the same ops (and so under
``torch.compile`` and ``torch.export``) with no device branch in the modules.

Today: ``csr_linear`` and ``bitmap_linear`` forward in float32, float16 and bfloat16 (values,
input, bias and output share one dtype; sums in float32), a warp per weight row for small batches.
CSR's backward (the input's gradient) runs torch's CUDA CSR matmul; bitmap's has none yet and says
so. BSR, N:M and convolutions have no CUDA kernels yet: they say so and name the formats that do.

Where the package was built without a CUDA compiler, ``import sparsenet`` still works and a CUDA
call gets a clear error saying how to build the kernels.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.dlpack import to_dlpack

from sparsenet.ops.csr_linear import as_rows
from sparsenet.ops.handles import cached

try:
    from sparsenet import _C_cuda
    _MISSING = None
except ImportError as error:  # built without a CUDA compiler (or its import failed): say why on use
    _C_cuda = None
    _MISSING = str(error)

# The ops with a CUDA kernel here.
OPS = ("csr_linear", "bitmap_linear")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether this build has its CUDA kernels (``sparsenet._C_cuda``); a GPU is another matter."""
    return _C_cuda is not None


def require() -> None:
    if _C_cuda is None:
        raise RuntimeError(
            "this sparsenet build has no CUDA kernels (sparsenet._C_cuda did not import: "
            f"{_MISSING}). Reinstall on a machine with the CUDA toolkit's nvcc on PATH "
            "(pip install . -Ccmake.define.SPARSENET_CUDA=ON fails loudly if it is not found), "
            "or run the model on the CPU"
        )


def check_input(x: torch.Tensor, values: torch.Tensor) -> None:
    """What a CUDA kernel needs of its input beyond what every sparse op checks: a build that has
    the kernels, and one dtype for input and weight."""
    require()
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 on CUDA, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the weight's values are {values.dtype}: "
                        f"convert one of them (module.to({x.dtype}) or x.to({values.dtype}))")


def _dl(t: torch.Tensor):
    return to_dlpack(t.detach())


# Each format's handle in _C_cuda, and which of its structure tensors holds the row pointers.
_HANDLES = {"csr": ("CsrHandle", 0), "bitmap": ("BitmapHandle", 1)}


def handle_cuda(format: str, structure: tuple, in_features: int):
    """The validated CUDA handle (its own device copy of the structure) for this weight, cached like
    the CPU handles: rebuilt when a tensor dies or changes in place."""
    require()
    kind, row_ptr_at = _HANDLES[format]
    device = structure[0].device
    for t in structure:
        if not t.is_cuda or not t.is_contiguous() or t.device != device:
            raise ValueError(f"the {format} weight's structure must be contiguous tensors on one CUDA device, "
                             f"got one on {t.device}")
    # 16-bit indices and masks are unsigned (formats/); DLPack export of uint16 is newer than the
    # torch versions supported, so they cross as int16 bits and the kernels read them unsigned.
    exported = [t.view(torch.int16) if t.dtype == torch.uint16 else t for t in structure]
    rows = structure[row_ptr_at].numel() - 1
    return cached(f"cuda:{device.index}:{format}", tuple(structure), in_features,
                  lambda: getattr(_C_cuda, kind)(rows, in_features, *(_dl(t) for t in exported)))


def _linear_cuda(format: str):
    def run(x, first, second, values, bias, in_features):
        check_input(x, values)
        handle = handle_cuda(format, (first, second), in_features)
        if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
            raise TypeError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
        x2 = as_rows(x, in_features)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], handle.rows, dtype=x.dtype, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        handle.matmul(_dl(values.contiguous()), _dl(x2), _dl(out),
                      None if bias is None else _dl(bias.contiguous()), stream)
        return out.reshape(*x.shape[:-1], handle.rows)

    return run


def _csr_grad_input_cuda(grad_out, crow_indices, col_indices, values, in_features):
    out_features = crow_indices.numel() - 1
    g2 = as_rows(grad_out, out_features)
    with warnings.catch_warnings():  # beta CSR support
        warnings.simplefilter("ignore", UserWarning)
        w = torch.sparse_csr_tensor(crow_indices, col_indices.to(torch.int64), values.detach(),
                                    (out_features, in_features), check_invariants=False)
        return torch.mm(g2, w).reshape(*grad_out.shape[:-1], in_features)


def _bitmap_grad_input_cuda(*args):
    raise NotImplementedError("the input's gradient through a bitmap layer has no CUDA kernel yet: "
                              "convert the layer with format='csr' to train through it on CUDA")


_lib = torch.library.Library("sparsenet", "IMPL")  # noqa: TOR901 (our namespace)
_lib.impl("csr_linear", _linear_cuda("csr"), "CUDA")
_lib.impl("csr_linear_grad_input", _csr_grad_input_cuda, "CUDA")
_lib.impl("bitmap_linear", _linear_cuda("bitmap"), "CUDA")
_lib.impl("bitmap_linear_grad_input", _bitmap_grad_input_cuda, "CUDA")
