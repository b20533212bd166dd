"""``sparsenet::<format>_linear`` custom ops for formats whose structure tensors are listed by their
packed class (``STRUCTURE``): one definition for all of them (BSR, N:M), registered like
``csr_linear`` (CPU impl, fake, autograd to the input and the bias) so that each appears as itself in
``torch.compile`` and ``torch.export`` graphs.

Their schema is ``(x, *structure, values, bias, in_features, out_features)``: the structure alone
need not say how many rows the weight has (partial BSR block rows), and the fake implementation
cannot read tensors.
"""
from __future__ import annotations

from typing import Callable

import torch

from sparsenet.ops.csr_linear import _check_input, _needs_autograd, as_rows, register_linear_autograd
from sparsenet.ops.handles import native_handle

_lib = torch.library.Library("sparsenet", "FRAGMENT")  # noqa: TOR901 (csr_linear defines the namespace)


def define_linear_op(packed: type) -> Callable:
    """Define and register ``sparsenet::<FORMAT>_linear`` for the packed class ``packed``; return its
    checked eager entry point ``(x, *structure, values, bias, in_features, out_features)``."""
    fmt, names = packed.FORMAT, packed.STRUCTURE
    k = len(names)
    structure = ", ".join(f"Tensor {n}" for n in names)
    _lib.define(f"{fmt}_linear(Tensor x, {structure}, Tensor values, Tensor? bias, int in_features, "
                "int out_features) -> Tensor")
    _lib.define(f"{fmt}_linear_grad_input(Tensor grad_out, {structure}, Tensor values, int in_features, "
                "int out_features) -> Tensor")

    def cpu(x, *args):
        tensors, (values, bias, in_features, out_features) = args[:k], args[k:]
        handle = native_handle(fmt, tensors, values, in_features, out_features)
        x2 = as_rows(x, in_features)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
        handle.matmul(values.detach().numpy(), x2.resolve_neg().detach().numpy(), out.numpy(),
                      None if bias is None else bias.detach().numpy())
        return out.reshape(*x.shape[:-1], out_features)

    def fake(x, *args):
        return x.new_empty(*x.shape[:-1], args[-1])

    def grad_input_cpu(grad_out, *args):
        # dx = dy @ W, W made dense from the handle's validated copy of the structure (never the
        # tensors themselves, which untracked writes may have broken since the forward).
        tensors, (values, in_features, out_features) = args[:k], args[k:]
        handle = native_handle(fmt, tensors, values, in_features, out_features)
        own = dict(zip(names, (torch.from_numpy(a.copy()) for a in handle.structure())))
        weight = packed.from_tensors({**own, "values": values.detach()}, (out_features, in_features)).to_dense()
        return (as_rows(grad_out, out_features) @ weight).reshape(*grad_out.shape[:-1], in_features)

    def grad_input_fake(grad_out, *args):
        return grad_out.new_empty(*grad_out.shape[:-1], args[-2])

    _lib.impl(f"{fmt}_linear", cpu, "CPU")
    torch.library.register_fake(f"sparsenet::{fmt}_linear")(fake)
    _lib.impl(f"{fmt}_linear_grad_input", grad_input_cpu, "CPU")
    torch.library.register_fake(f"sparsenet::{fmt}_linear_grad_input")(grad_input_fake)
    op = getattr(torch.ops.sparsenet, f"{fmt}_linear")
    grad_op = getattr(torch.ops.sparsenet, f"{fmt}_linear_grad_input")
    register_linear_autograd(f"{fmt}_linear", lambda *a: grad_op(*a), n_structure=k, n_ints=2)

    def linear(x, *args) -> torch.Tensor:
        """Checked entry point: clear errors for what the op cannot run, then the op (eager calls with
        nothing to differentiate skip the dispatcher, as ``csr_linear`` does)."""
        values, bias, in_features = args[k], args[k + 1], args[k + 2]
        _check_input(x, values, in_features, f"{fmt}_linear")
        if not torch.compiler.is_compiling() and not _needs_autograd(x, bias) and x.device.type == "cpu":
            return cpu(x, *args)
        return op(x, *args)

    linear.__name__ = linear.__qualname__ = f"{fmt}_linear"
    return linear
