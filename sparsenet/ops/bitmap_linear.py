"""The ``sparsenet::bitmap_linear`` custom op: y = x @ W.T + bias with W a bitmap weight
(``sparsenet.formats.PackedBitmap``'s layout), registered like ``csr_linear`` (CPU impl, fake,
autograd to the input and the bias) so that it appears as itself in ``torch.compile`` and
``torch.export`` graphs.
"""
from __future__ import annotations

import torch

from sparsenet.formats.bitmap import stored_positions
from sparsenet.ops.csr_linear import _check_input, _check_rows, _needs_autograd, as_rows, register_linear_autograd
from sparsenet.ops.handles import bitmap_handle

_lib = torch.library.Library("sparsenet", "FRAGMENT")  # noqa: TOR901 (csr_linear defines the namespace)
_lib.define("bitmap_linear(Tensor x, Tensor masks, Tensor row_ptr, Tensor values, Tensor? bias, int in_features) -> Tensor")
_lib.define("bitmap_linear_grad_input(Tensor grad_out, Tensor masks, Tensor row_ptr, Tensor values, "
            "int in_features) -> Tensor")


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _bitmap_linear_cpu(x, masks, row_ptr, values, bias, in_features):
    handle = bitmap_handle(masks, row_ptr, values, in_features)
    x2 = as_rows(x, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], handle.rows, dtype=torch.float32)
    handle.matmul(_np(values), _np(x2.resolve_neg()), out.numpy(), None if bias is None else _np(bias))
    return out.reshape(*x.shape[:-1], handle.rows)


_lib.impl("bitmap_linear", _bitmap_linear_cpu, "CPU")


@torch.library.register_fake("sparsenet::bitmap_linear")
def _bitmap_linear_fake(x, masks, row_ptr, values, bias, in_features):
    return x.new_empty(*x.shape[:-1], row_ptr.shape[0] - 1)


def _grad_input_cpu(grad_out, masks, row_ptr, values, in_features):
    # dx = dy @ W with W made dense from the handle's validated copy of the structure (never the
    # tensors themselves, which untracked writes may have broken since the forward).
    handle = bitmap_handle(masks, row_ptr, values, in_features)
    own_masks, _ = handle.structure()
    rows = handle.rows
    keep = stored_positions(torch.from_numpy(own_masks.astype("int32")), rows, in_features)
    weight = torch.zeros(rows, in_features, dtype=values.dtype)
    weight[keep] = values.detach()
    return (as_rows(grad_out, rows) @ weight).reshape(*grad_out.shape[:-1], in_features)


_lib.impl("bitmap_linear_grad_input", _grad_input_cpu, "CPU")


@torch.library.register_fake("sparsenet::bitmap_linear_grad_input")
def _grad_input_fake(grad_out, masks, row_ptr, values, in_features):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


register_linear_autograd("bitmap_linear", lambda *args: torch.ops.sparsenet.bitmap_linear_grad_input(*args))


def bitmap_linear(x, masks, row_ptr, values, bias, in_features: int, out_features=None) -> torch.Tensor:
    """Checked entry point: clear errors for what the op cannot run, then the op (eager calls with
    nothing to differentiate skip the dispatcher, as ``csr_linear`` does)."""
    _check_input(x, values, in_features, "bitmap_linear")
    _check_rows(row_ptr.numel() - 1, out_features)
    if not torch.compiler.is_compiling() and not _needs_autograd(x, bias) and x.device.type == "cpu":
        return _bitmap_linear_cpu(x, masks, row_ptr, values, bias, in_features)
    return torch.ops.sparsenet.bitmap_linear(x, masks, row_ptr, values, bias, in_features)
