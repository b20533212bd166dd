"""The ``sparsenet::bsr_linear`` custom op: y = x @ W.T + bias with W a block-sparse weight
(``sparsenet.formats.PackedBSR``'s layout), registered like ``csr_linear`` (CPU impl, fake, autograd
to the input and the bias) so that it appears as itself in ``torch.compile`` and ``torch.export``
graphs. It takes ``out_features`` too: partial block rows mean the structure alone cannot say it.
"""
from __future__ import annotations

import torch

from sparsenet.formats.bsr import PackedBSR
from sparsenet.ops.csr_linear import _check_input, _needs_autograd, register_linear_autograd
from sparsenet.ops.handles import bsr_handle

_lib = torch.library.Library("sparsenet", "FRAGMENT")  # noqa: TOR901 (csr_linear defines the namespace)
_lib.define("bsr_linear(Tensor x, Tensor block_shape, Tensor block_ptr, Tensor block_cols, Tensor values, "
            "Tensor? bias, int in_features, int out_features) -> Tensor")
_lib.define("bsr_linear_grad_input(Tensor grad_out, Tensor block_shape, Tensor block_ptr, Tensor block_cols, "
            "Tensor values, int in_features, int out_features) -> Tensor")


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _bsr_linear_cpu(x, block_shape, block_ptr, block_cols, values, bias, in_features, out_features):
    handle = bsr_handle(block_shape, block_ptr, block_cols, values, in_features, out_features)
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    handle.matmul(_np(values), _np(x2.resolve_neg()), out.numpy(), None if bias is None else _np(bias))
    return out.reshape(*x.shape[:-1], out_features)


_lib.impl("bsr_linear", _bsr_linear_cpu, "CPU")


@torch.library.register_fake("sparsenet::bsr_linear")
def _bsr_linear_fake(x, block_shape, block_ptr, block_cols, values, bias, in_features, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _grad_input_cpu(grad_out, block_shape, block_ptr, block_cols, values, in_features, out_features):
    # dx = dy @ W, W made dense from the handle's validated copy of the structure (never the tensors
    # themselves, which untracked writes may have broken since the forward).
    handle = bsr_handle(block_shape, block_ptr, block_cols, values, in_features, out_features)
    own = [torch.from_numpy(a.copy()) for a in handle.structure()]
    weight = PackedBSR(*own, values.detach(), (out_features, in_features)).to_dense()
    return (grad_out.reshape(-1, out_features) @ weight).reshape(*grad_out.shape[:-1], in_features)


_lib.impl("bsr_linear_grad_input", _grad_input_cpu, "CPU")


@torch.library.register_fake("sparsenet::bsr_linear_grad_input")
def _grad_input_fake(grad_out, block_shape, block_ptr, block_cols, values, in_features, out_features):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


register_linear_autograd("bsr_linear", lambda *args: torch.ops.sparsenet.bsr_linear_grad_input(*args),
                         n_structure=3, n_ints=2)


def bsr_linear(x, block_shape, block_ptr, block_cols, values, bias, in_features: int, out_features: int) -> torch.Tensor:
    """Checked entry point: clear errors for what the op cannot run, then the op (eager calls with
    nothing to differentiate skip the dispatcher, as ``csr_linear`` does)."""
    _check_input(x, values, in_features)
    if not torch.compiler.is_compiling() and not _needs_autograd(x, bias):
        return _bsr_linear_cpu(x, block_shape, block_ptr, block_cols, values, bias, in_features, out_features)
    return torch.ops.sparsenet.bsr_linear(x, block_shape, block_ptr, block_cols, values, bias, in_features,
                                          out_features)
