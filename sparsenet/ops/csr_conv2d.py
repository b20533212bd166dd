"""The ``sparsenet::csr_conv2d`` custom op: a 2-D convolution (stride, padding, dilation, groups,
bias; zero padding) whose weight is a packed CSR matrix of shape
``(out_channels, in_channels / groups * kh * kw)``, columns in PyTorch's (channel, row, column) order.
Registered like ``csr_linear`` (CPU impl, fake, autograd to the input and the bias) so that it appears
as itself in ``torch.compile`` and ``torch.export`` graphs. See ``csrc/cpu/conv.h`` for the kernels.

``geometry`` is ``[in_channels, out_channels, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
groups]``. The op takes and returns contiguous NCHW; ``SparseConv2d`` restores a channels-last input's
layout around it.
"""
from __future__ import annotations

import torch

from torch.utils.dlpack import from_dlpack, to_dlpack

from sparsenet.formats import PackedCSR
from sparsenet.ops.csr_linear import PreparedSparse
from sparsenet.ops.handles import csr_handle

_lib = torch.library.Library("sparsenet", "FRAGMENT")  # noqa: TOR901 (csr_linear defines the namespace)
_lib.define("csr_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
            "int[] geometry) -> Tensor")
_lib.define("csr_conv2d_grad_input(Tensor grad_out, Tensor crow_indices, Tensor col_indices, Tensor values, "
            "int[] geometry, int[] input_shape) -> Tensor")


def output_size(geometry, height: int, width: int) -> tuple[int, int]:
    _, _, kh, kw, sh, sw, ph, pw, dh, dw, _ = geometry
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def columns(geometry) -> int:
    """The packed weight's columns: in_channels / groups * kh * kw."""
    in_channels, _, kh, kw = geometry[:4]
    return in_channels // geometry[10] * kh * kw


def _conv_cpu(x, crow_indices, col_indices, values, bias, geometry):
    handle = csr_handle(crow_indices, col_indices, values, columns(geometry))
    n, _, h, w = x.shape
    out = torch.empty(n, geometry[1], *output_size(geometry, h, w), dtype=torch.float32)
    handle.conv2d(values.detach().numpy(), x.detach().resolve_neg().contiguous().numpy(), out.numpy(),
                  None if bias is None else bias.detach().numpy(), list(geometry[2:]))
    return out


_lib.impl("csr_conv2d", _conv_cpu, "CPU")


@torch.library.register_fake("sparsenet::csr_conv2d")
def _conv_fake(x, crow_indices, col_indices, values, bias, geometry):
    return x.new_empty(x.shape[0], geometry[1], *output_size(geometry, x.shape[2], x.shape[3]))


def dense_weight(handle, values: torch.Tensor, geometry) -> torch.Tensor:
    """The (out, in / groups, kh, kw) weight from the handle's validated structure and ``values``."""
    crow, col = (torch.from_numpy(a.copy()) for a in handle.structure())
    packed = PackedCSR(crow, col, values.detach(), (geometry[1], columns(geometry)))
    return packed.to_dense().reshape(geometry[1], geometry[0] // geometry[10], geometry[2], geometry[3])


def _grad_input_cpu(grad_out, crow_indices, col_indices, values, geometry, input_shape):
    # dx through torch's own transposed convolution of the dense weight (the backward pass is rarely
    # hot), made from the handle's validated copy of the structure.
    weight = dense_weight(csr_handle(crow_indices, col_indices, values, columns(geometry)), values, geometry)
    _, _, _, _, sh, sw, ph, pw, dh, dw, groups = geometry
    return torch.nn.grad.conv2d_input(list(input_shape), weight, grad_out, (sh, sw), (ph, pw), (dh, dw), groups)


_lib.impl("csr_conv2d_grad_input", _grad_input_cpu, "CPU")


@torch.library.register_fake("sparsenet::csr_conv2d_grad_input")
def _grad_input_fake(grad_out, crow_indices, col_indices, values, geometry, input_shape):
    return grad_out.new_empty(input_shape)


def _setup_context(ctx, inputs, output):
    x, crow, col, values, _bias, geometry = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.geometry, ctx.input_shape = geometry, tuple(x.shape)


def _backward(ctx, grad_out):
    crow, col, values = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise RuntimeError("the sparse weight of a SparseConv2d is frozen: set values.requires_grad_(False)")
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsenet.csr_conv2d_grad_input(grad_out.contiguous(), crow, col, values, ctx.geometry,
                                                           list(ctx.input_shape))
    if ctx.needs_input_grad[4]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_x, None, None, None, grad_bias, None


torch.library.register_autograd("sparsenet::csr_conv2d", _backward, setup_context=_setup_context)


def csr_conv2d(x, crow_indices, col_indices, values, bias, geometry) -> torch.Tensor:
    """Checked entry point: clear errors for what the op cannot run, then the op; x is (N, C, H, W)
    (any memory format; the result is contiguous NCHW)."""
    from sparsenet.ops.csr_linear import _needs_autograd, check_tensor_input

    check_tensor_input(x, values, "csr_conv2d")
    if x.dim() != 4 or x.shape[1] != geometry[0]:
        raise ValueError(f"x must have shape (N, {geometry[0]}, H, W), got {tuple(x.shape)}")
    geometry = [int(g) for g in geometry]
    if not torch.compiler.is_compiling() and not _needs_autograd(x, bias) and x.device.type == "cpu":
        return _conv_cpu(x, crow_indices, col_indices, values, bias, geometry)
    return torch.ops.sparsenet.csr_conv2d(x, crow_indices, col_indices, values, bias, geometry)


class PreparedConv(PreparedSparse):
    """SparseConv2d's prepared fast path for eager inference, as ``PreparedSparse`` is SparseLinear's
    (valid while the module holds the very tensors it was made from, unmodified): a handle that keeps
    the values and bias, and one native call per forward that takes x as a DLPack capsule and
    returns a new output (a trivial convolution went from 24 to about 10 us a call, nn.Conv2d's)."""

    __slots__ = ("full_geometry", "kernel_geometry")

    def __init__(self, crow_indices, col_indices, values, bias, geometry) -> None:
        super().__init__(("crow_indices", "col_indices"), (crow_indices, col_indices), values, bias,
                         columns(geometry), geometry[1])
        self.full_geometry = list(geometry)
        self.kernel_geometry = list(geometry[2:])

    def __call__(self, x: torch.Tensor):
        """The output for a float32 4-D CPU ``x`` (made contiguous NCHW first, as the op would: a
        channels-last model's every call); None for anything else (the caller then takes the op,
        which converts what it can and raises the precise error for the rest)."""
        try:
            y = self.handle.forward_conv2d(to_dlpack(x.contiguous().resolve_neg()), self.kernel_geometry)
        except (TypeError, ValueError, RuntimeError, BufferError):
            return None
        height, width = output_size(self.full_geometry, x.shape[2], x.shape[3])
        return from_dlpack(y).view(x.shape[0], self.out_features, height, width)
