"""SparseConv2d: a drop-in ``nn.Conv2d`` whose weight is stored as packed CSR and run natively
(``sparsenet.ops.csr_conv2d``), without materialising the im2col matrix."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.compiler import is_compiling
from torch.nn.modules.utils import _pair

from sparsenet.formats import PackedCSR
from sparsenet.nn.linear import SparseWeightModule, _index_dtype, _values_storage
from sparsenet.formats import hugepages
from sparsenet.ops.csr_conv2d import PreparedConv, csr_conv2d
from sparsenet.ops.csr_linear import _needs_autograd


def _ints(value, name: str) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """An ``nn.Conv2d``'s zero padding as two ints; ValueError for what SparseConv2d cannot run
    (another ``padding_mode``, ``padding="same"`` that needs uneven padding)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r}: SparseConv2d pads with zeros only")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(r % 2 for r in reach):
            raise ValueError("padding='same' with an even kernel reach pads unevenly, which SparseConv2d cannot")
        return (reach[0] // 2, reach[1] // 2)
    return _ints(conv.padding, "padding")


class SparseConv2d(SparseWeightModule):
    """A 2-D convolution (stride, padding, dilation, groups, bias; zero padding) with the forward
    semantics of ``nn.Conv2d``, its weight held as a packed CSR matrix of shape
    ``(out_channels, in_channels / groups * kh * kw)``: ``crow_indices`` (int64) and ``col_indices``
    (uint16, or int32 past 65536 columns) buffers and a ``values`` Parameter (frozen). Inputs may be
    contiguous or channels-last (the output keeps the input's memory format) and batched or not.
    Gradients flow to the input and the bias.
    """

    format = "csr"

    @torch.inference_mode(False)
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "groups" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'groups' else 'non-negative'} int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _ints(kernel_size, "kernel_size")
        self.stride = _ints(stride, "stride")
        self.padding = _ints(padding, "padding")
        self.dilation = _ints(dilation, "dilation")
        if min(*self.kernel_size, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size, stride and dilation must be positive and padding non-negative")
        cols = self.packed_shape[1]
        self.register_buffer("crow_indices", torch.zeros(out_channels + 1, dtype=torch.int64))
        self.register_buffer("col_indices", torch.zeros(0, dtype=_index_dtype(cols)))
        self.values = nn.Parameter(_values_storage(0, torch.float32, torch.device("cpu")), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)

    @property
    def packed_shape(self) -> tuple[int, int]:
        return (self.out_channels, self.in_channels // self.groups * math.prod(self.kernel_size))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def geometry(self) -> list[int]:
        """What the op takes: in/out channels, kernel, stride, padding, dilation, groups."""
        return [self.in_channels, self.out_channels, *self.kernel_size, *self.stride, *self.padding, *self.dilation,
                self.groups]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode(False)
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[torch.Tensor] = None) -> "SparseConv2d":
        """Convert an ``nn.Conv2d``: zeros (and entries where ``mask``, of the weight's shape, is
        False) are dropped. A layer pruned by ``sparsenet.prune`` or ``torch.nn.utils.prune`` is
        read through its mask."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        from sparsenet._masks import effective_weight_and_mask

        padding = conv_padding(conv)
        weight, own_mask = effective_weight_and_mask(conv)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(weight.shape)}")
            own_mask = mask if own_mask is None else (own_mask & mask.to(own_mask.device))
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                    conv.groups, bias=conv.bias is not None)
        matrix = weight.detach().to(device="cpu", dtype=torch.float32).reshape(layer.packed_shape)
        keep = None if own_mask is None else own_mask.detach().cpu().reshape(layer.packed_shape)
        packed = PackedCSR.from_dense(matrix.contiguous(), None if keep is None else keep.contiguous())
        layer.crow_indices = packed.crow_indices.clone()
        layer.col_indices = packed.col_indices.clone()
        layer.values = nn.Parameter(hugepages.copy_group([packed.values])[0], requires_grad=False)
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().to(device="cpu", dtype=torch.float32).clone())
        return layer

    # ---- views --------------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_channels, in_channels / groups, kh, kw)`` weight, on the layer's device in
        its dtype."""
        return self._like_values(self.to_packed().to_dense().reshape(self.weight_shape))

    def to_dense_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, device=self.values.device,
                         dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        channels_last = (isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
        y = self._convolve(x)
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return y.squeeze(0) if unbatched else y

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        buffers, params = self._buffers, self._parameters
        crow, col, values, bias = buffers["crow_indices"], buffers["col_indices"], params["values"], params["bias"]
        if not is_compiling() and isinstance(x, torch.Tensor) and not _needs_autograd(x, bias):
            # Eager inference: the prepared fast path (PreparedConv), made once per set of tensors.
            prepared = self.__dict__.get("_prepared")
            if prepared is None or not prepared.matches(buffers, values, bias):
                self.__dict__.pop("_prepared", None)  # a stale one would keep the old tensors alive
                prepared = None
                if self._preparable(crow, col, values, bias):
                    prepared = self.__dict__["_prepared"] = PreparedConv(crow, col, values, bias, self.geometry)
            y = None if prepared is None else prepared(x)
            if y is not None:
                return y
        # The checked op: compiled graphs, autograd, other devices and dtypes, inference tensors (no
        # version counters to tell a prepared handle it is stale), inputs it must convert.
        return csr_conv2d(x, crow, col, values, bias, self.geometry)

    @staticmethod
    def _preparable(crow, col, values, bias) -> bool:
        tensors = (crow, col, values) if bias is None else (crow, col, values, bias)
        return (all(t.device.type == "cpu" and not t.is_inference() for t in tensors)
                and values.dtype == torch.float32 and (bias is None or (bias.dtype == torch.float32
                                                                         and bias.is_contiguous())))

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}", f"stride={self.stride}"]
        if self.padding != (0, 0):
            parts.append(f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts.append(f"bias={self.bias is not None}, density={self.density:.4f}, nnz={self.nnz}, format=csr")
        return ", ".join(parts)
