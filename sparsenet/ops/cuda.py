"""The CUDA backend: the kernels of ``sparsenet._C_cuda`` registered for the sparse ops' CUDA dispatch
key, so a sparse module moved with ``.to("cuda")`` runs them through the same ops (and so under
``torch.compile`` and ``torch.export``) with no device branch in the modules.

Today, forward in float32, float16 and bfloat16 (values, input, bias and output share one dtype;
sums in float32): ``csr_linear``, ``bitmap_linear`` and ``nm_linear`` with a warp per weight row
(small batches; N:M has no sparse tensor-core path yet), ``bsr_linear`` with each stored block and
64 inputs staged in shared memory and multiplied on the tensor cores (float16, bfloat16; float32 on
the CUDA cores); ``csr_conv2d`` with a thread per output element summing over its channel's stored
weights (direct: no im2col). CSR's backward (the input's gradient) runs torch's CUDA CSR matmul;
the others' have none yet and say so.

Where the package was built without a CUDA compiler, ``import sparsenet`` still works and a CUDA
call gets a clear error saying how to build the kernels.
"""
from __future__ import annotations

import importlib
import warnings

import torch
from torch.utils.dlpack import to_dlpack

from sparsenet.ops.csr_conv2d import columns as conv_columns, output_size
from sparsenet.ops.csr_linear import as_rows
from sparsenet.ops.handles import cached

try:  # (by its full name: "from sparsenet import" reads as a circular import while sparsenet loads)
    _C_cuda = importlib.import_module("sparsenet._C_cuda")
    _MISSING = None
except ImportError as error:  # built without a CUDA compiler (or its import failed): say why on use
    _C_cuda = None
    _MISSING = str(error)

# The ops with a CUDA kernel here.
OPS = ("csr_linear", "bitmap_linear", "bsr_linear", "nm_linear", "csr_conv2d")
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


def _check_bias(bias, x: torch.Tensor) -> None:
    _check_bias(bias, x)


def _dl(t: torch.Tensor):
    return to_dlpack(t.detach())


# Each format's handle in _C_cuda, how many structure tensors its op takes before the values, and
# which of them holds the row pointers (None: the op is handed out_features).
_HANDLES = {"csr": ("CsrHandle", 2, 0), "bitmap": ("BitmapHandle", 2, 1), "bsr": ("BsrHandle", 3, None),
            "nm": ("NmHandle", 2, None)}


def handle_cuda(format: str, structure: tuple, rows: int, in_features: int):
    """The validated CUDA handle (its own device copy of the structure) for this weight, cached like
    the CPU handles: rebuilt when a tensor dies or changes in place."""
    require()
    device = structure[0].device
    for t in structure:
        if not t.is_cuda or not t.is_contiguous() or t.device != device:
            raise ValueError(f"the {format} weight's structure must be contiguous tensors on one CUDA device, "
                             f"got one on {t.device}")
    # 16-bit indices and masks are unsigned (formats/); DLPack export of uint16 is newer than the
    # torch versions supported, so they cross as int16 bits and the kernels read them unsigned.
    exported = [t.view(torch.int16) if t.dtype == torch.uint16 else t for t in structure]
    kind = _HANDLES[format][0]
    return cached(f"cuda:{device.index}:{format}", tuple(structure), (rows, in_features),
                  lambda: getattr(_C_cuda, kind)(rows, in_features, *(_dl(t) for t in exported)))


def _linear_cuda(format: str):
    """The CUDA kernel of ``sparsenet::<format>_linear(x, *structure, values, bias, in_features[,
    out_features])``."""
    _, n, row_ptr_at = _HANDLES[format]

    def run(x, *args):
        structure, (values, bias, in_features, *out) = args[:n], args[n:]
        check_input(x, values)
        rows = out[0] if row_ptr_at is None else structure[row_ptr_at].numel() - 1
        handle = handle_cuda(format, structure, rows, in_features)
        _check_bias(bias, x)
        x2 = as_rows(x, in_features)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
            x2 = x2.contiguous()
        out_t = torch.empty(x2.shape[0], handle.rows, dtype=x.dtype, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        handle.matmul(_dl(values.contiguous()), _dl(x2), _dl(out_t),
                      None if bias is None else _dl(bias.contiguous()), stream)
        return out_t.reshape(*x.shape[:-1], handle.rows)

    return run


def _conv_cuda(x, crow_indices, col_indices, values, bias, geometry):
    check_input(x, values)
    handle = handle_cuda("csr", (crow_indices, col_indices), crow_indices.numel() - 1, conv_columns(geometry))
    _check_bias(bias, x)
    n, _, h, w = x.shape
    out = torch.empty(n, geometry[1], *output_size(geometry, h, w), dtype=x.dtype, device=x.device)
    handle.conv2d(_dl(values.contiguous()), _dl(x.contiguous()), _dl(out),
                  None if bias is None else _dl(bias.contiguous()), list(geometry[2:]),
                  torch.cuda.current_stream(x.device).cuda_stream)
    return out


def _csr_grad_input_cuda(grad_out, crow_indices, col_indices, values, in_features):
    out_features = crow_indices.numel() - 1
    # torch's CSR matmul trusts its structure: validated first (the cached handle, rebuilt and so
    # re-validated if the tensors changed since the forward).
    handle_cuda("csr", (crow_indices, col_indices), out_features, in_features)
    g2 = as_rows(grad_out, out_features)
    with warnings.catch_warnings():  # beta CSR support
        warnings.simplefilter("ignore", UserWarning)
        w = torch.sparse_csr_tensor(crow_indices, col_indices.to(torch.int64), values.detach(),
                                    (out_features, in_features), check_invariants=False)
        return torch.mm(g2, w).reshape(*grad_out.shape[:-1], in_features)


def _no_grad_input(format: str):
    def refuse(*args):
        hint = "" if format == "convolution" else ": convert the layer with format='csr' to train through it on CUDA"
        raise NotImplementedError(f"the input's gradient through a {format} layer has no CUDA kernel yet{hint}")
    return refuse


_lib = torch.library.Library("sparsenet", "IMPL")  # noqa: TOR901 (our namespace)
_lib.impl("csr_linear", _linear_cuda("csr"), "CUDA")
_lib.impl("csr_linear_grad_input", _csr_grad_input_cuda, "CUDA")
for _format in ("bitmap", "bsr", "nm"):
    _lib.impl(f"{_format}_linear", _linear_cuda(_format), "CUDA")
    _lib.impl(f"{_format}_linear_grad_input", _no_grad_input(_format), "CUDA")
_lib.impl("csr_conv2d", _conv_cuda, "CUDA")
_lib.impl("csr_conv2d_grad_input", _no_grad_input("convolution"), "CUDA")
