"""The ``sparsenet::csr_linear`` custom op: y = x @ W.T + bias with W a packed CSR weight.

Registered through the low-level ``torch.library.Library`` API (define + CPU impl + fake + autograd),
which dispatches with less Python overhead than the ``torch.library.custom_op`` decorator (measured in
benchmarks/bench_overhead.py). Being a real op, it shows up as itself in ``torch.compile`` and
``torch.export`` graphs instead of a dense fallback.
"""
from __future__ import annotations

import math
import operator
import warnings

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from sparsenet.ops.handles import csr_handle, owning_handle

_lib = torch.library.Library("sparsenet", "DEF")  # noqa: TOR901 (we own this namespace)
_lib.define(
    "csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
    "int in_features) -> Tensor"
)
# dx = dy @ W for the backward pass, an op of its own so that compiled graphs (which trace the
# backward with fake tensors) never see torch's CSR constructor.
_lib.define(
    "csr_linear_grad_input(Tensor grad_out, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int in_features) -> Tensor"
)


def _np(t: torch.Tensor):
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _csr_linear_cpu(x, crow_indices, col_indices, values, bias, in_features):
    handle = csr_handle(crow_indices, col_indices, values, in_features)
    x2 = x if x.dim() == 2 else as_rows(x, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], handle.rows, dtype=torch.float32)
    handle.matmul(_np(values), _np(x2.resolve_neg()), out.numpy(), None if bias is None else _np(bias))
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], handle.rows)


_lib.impl("csr_linear", _csr_linear_cpu, "CPU")


@torch.library.register_fake("sparsenet::csr_linear")
def _csr_linear_fake(x, crow_indices, col_indices, values, bias, in_features):
    return x.new_empty(*x.shape[:-1], crow_indices.shape[0] - 1)


def _grad_input_cpu(grad_out, crow_indices, col_indices, values, in_features):
    out_features = crow_indices.numel() - 1
    g2 = as_rows(grad_out, out_features)
    # The structure comes from the handle's validated copy, never from the tensors themselves: a
    # write that torch does not track may have broken them since the forward, and torch's CSR
    # matmul (fine for the rarely hot backward pass) trusts what it is given.
    crow, col = csr_handle(crow_indices, col_indices, values, in_features).structure()
    with warnings.catch_warnings():  # beta CSR support; read-only numpy views (torch only reads them)
        warnings.simplefilter("ignore", UserWarning)
        w = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(col.astype("int64")), values.detach(),
                                    (out_features, in_features), check_invariants=False)
        return torch.mm(g2, w).reshape(*grad_out.shape[:-1], in_features)


_lib.impl("csr_linear_grad_input", _grad_input_cpu, "CPU")


@torch.library.register_fake("sparsenet::csr_linear_grad_input")
def _grad_input_fake(grad_out, crow_indices, col_indices, values, in_features):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


def register_linear_autograd(op: str, grad_input, n_structure: int = 2, n_ints: int = 1) -> None:
    """Autograd of a ``sparsenet::<op>(x, <n_structure tensors>, values, bias, <n_ints ints>)`` linear
    op: gradients to the input (``grad_input(grad_out, *structure, values, *ints)``, an op of its own so
    compiled graphs trace it with fake tensors) and to the bias; the sparse weight is frozen."""
    values_at = 1 + n_structure

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:values_at + 1])
        ctx.ints = inputs[values_at + 2:]

    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        if ctx.needs_input_grad[values_at]:
            raise RuntimeError("the sparse weight of a SparseLinear is frozen: set values.requires_grad_(False)")
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(grad_out, *saved, *ctx.ints)
        if ctx.needs_input_grad[values_at + 1]:
            grad_bias = as_rows(grad_out, grad_out.shape[-1]).sum(0)
        return (grad_x, *([None] * n_structure), None, grad_bias, *([None] * n_ints))

    torch.library.register_autograd(f"sparsenet::{op}", backward, setup_context=setup_context)


register_linear_autograd("csr_linear", lambda *args: torch.ops.sparsenet.csr_linear_grad_input(*args))


_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


def as_rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """``t`` (..., features) as a matrix of its rows: ``reshape(-1, features)``, which cannot infer
    the row count when ``features`` is 0."""
    return t.reshape(math.prod(t.shape[:-1]), features)


def _check_input(x, values, in_features: int, op: str = "csr_linear") -> None:
    check_tensor_input(x, values, op)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {tuple(x.shape)}")


def check_tensor_input(x, values, op: str) -> None:
    """What every sparse op (``op``, e.g. "csr_linear", for the messages) needs of its input whatever
    its shape: a strided tensor on the weight's device; float32 on the CPU; on CUDA, the weight's
    dtype and a build with the CUDA kernels (ops/cuda.py)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}; use x.to_dense()")
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {values.device}: move the module to the "
                         f"input's device (module.to(x.device)) or the input to the module's")
    if x.device.type == "cpu":
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32, got {x.dtype} (sparsenet's CPU kernels run in float32)")
        if values.dtype != torch.float32:
            raise TypeError(f"the weight's values are {values.dtype}: sparsenet's CPU kernels run in float32; "
                            f"run the layer on CUDA or convert it back with module.float()")
        return
    if x.device.type != "cuda":
        raise ValueError(f"sparsenet has no {x.device.type} kernel for {op}: run it on the CPU or on CUDA")
    from sparsenet.ops import cuda  # (here: ops/cuda.py imports this module)

    cuda.check_input(x, values)


def _needs_autograd(x, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _check_rows(rows: int, out_features) -> None:
    if out_features is not None and out_features != rows:
        raise ValueError(f"out_features={out_features} does not match the weight's {rows} rows")


def csr_linear(x, crow_indices, col_indices, values, bias, in_features: int, out_features=None) -> torch.Tensor:
    """Checked entry point: clear errors for what the op itself cannot run, then the op."""
    _check_input(x, values, in_features)
    _check_rows(crow_indices.numel() - 1, out_features)
    if not torch.compiler.is_compiling() and not _needs_autograd(x, bias) and x.device.type == "cpu":
        # Eager call with nothing to differentiate: skip the dispatcher (a few microseconds per
        # call, which matter for small layers at batch 1). Compiled and exported graphs, calls
        # that need autograd and other devices always go through the registered op.
        return _csr_linear_cpu(x, crow_indices, col_indices, values, bias, in_features)
    return torch.ops.sparsenet.csr_linear(x, crow_indices, col_indices, values, bias, in_features)


class PreparedSparse:
    """Everything an eager call needs, made once per weight (of any registered format): a validated
    handle that keeps the structure, the values and the bias alive itself. A module keeps one
    (``SparseLinear``), so a forward at batch 1 costs a few identity checks and one native call that
    also allocates the output.

    Few Python objects touched per call matters more than it seems: a layer that runs after another
    one that streamed tens of MB finds the interpreter's and torch's data evicted from every cache
    and TLB, and each distinct object or function then costs a miss (measured: ~110 us of cold
    overhead per batch-1 call of the first path, against a 0.3 ms kernel). So x and the result cross
    into the native module as DLPack capsules: exporting one costs well under 1 us there, a numpy
    view of x ~15 us.

    It is valid while the module still holds the very same tensors, at the same addresses, none of
    them modified in place (version counters; the handle's derived copies include the values); anything
    else makes the module prepare a new one.
    """

    __slots__ = ("names", "tensors", "state", "handle", "values", "bias", "in_features", "out_features")

    def __init__(self, names: tuple, structure: tuple, values, bias, in_features: int, out_features: int,
                 format: str = "csr") -> None:
        self.names = names  # of the structure buffers, in the format's order
        self.tensors = (*structure, values) if bias is None else (*structure, values, bias)
        self.values, self.bias = values, bias
        self.state = self._state(self.tensors)
        self.handle = owning_handle(format, structure, values, in_features, out_features, bias)
        self.in_features = in_features
        self.out_features = out_features

    @staticmethod
    def _state(tensors) -> tuple:
        # map over C-level getters: this runs on every eager call.
        return (*map(_DATA_PTR, tensors), *map(_VERSION, tensors))

    def matches(self, buffers: dict, values, bias) -> bool:
        """Whether a module's structure ``buffers`` (by name), ``values`` and ``bias`` are the very
        tensors this was made from, unmodified."""
        if values is not self.values or bias is not self.bias:
            return False
        tensors = self.tensors
        for i, name in enumerate(self.names):
            if buffers[name] is not tensors[i]:
                return False
        return self.state == self._state(tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The common case (2-D float32 CPU, unit stride along features) in one native call, which
        # checks all of that itself. Whatever it refuses takes the general path, which converts
        # what it can and raises the precise error for the rest.
        try:
            # resolve_neg: DLPack exports the memory as it is, without a lazy negation (it is x
            # itself when there is none, the common case).
            y = self.handle.forward(to_dlpack(x.resolve_neg()))
        except (TypeError, ValueError, RuntimeError, BufferError):
            return self._general(x)
        return from_dlpack(y)

    def _general(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.values, self.in_features)
        x2 = as_rows(x, self.in_features)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < self.in_features):
            x2 = x2.contiguous()
        out = from_dlpack(self.handle.forward(to_dlpack(x2.resolve_neg())))
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)
