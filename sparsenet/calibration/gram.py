"""Second-moment statistics of a layer's input: ``XᵀX``, ``Σx`` and the row count, in float64.

Layer-wise reconstruction needs the whole quadratic form of each layer's input, not only its
diagonal. ``X`` is the layer's input as a matrix of rows: tokens for ``nn.Linear`` and Hugging
Face's Conv1D (padding tokens dropped), image patches for ``nn.Conv2d`` (the im2col unfold,
columns ordered ``(in_channel, kh, kw)`` like the flattened weight). Rows are folded into the
sums as they arrive and never kept, so memory is one ``cols x cols`` matrix per layer.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._weights import matrix_shape
from .capture import _run_with_hooks, _token_rows

# Rows per float32 partial product: small enough that float32 loses nothing material (the
# partial sums are added in float64), large enough that the matmul runs at full speed.
CHUNK_ROWS = 4096


def conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches of a Conv2d as rows ``(n_patches, in_channels * kh * kw)``.

    Padding (any ``padding_mode``, string paddings too) is applied the way the layer applies
    it, so each row is exactly what one output position's filter sees.
    """
    if module.groups != 1:
        raise ValueError(
            f"grouped convolution (groups={module.groups}) is not supported by layer-wise "
            "reconstruction; exclude the layer"
        )
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_rows(module: nn.Module, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """A layer's input as the rows its weight multiplies: ``y_row = W @ x_row (+ b)``."""
    if isinstance(module, nn.Conv2d):
        return conv_patches(module, x)
    return _token_rows(x, attention_mask)


class Gram:
    """Running ``XᵀX`` (float64), ``Σx`` and row count of one layer's input.

    ``hessian()`` is the mean ``XᵀX / n`` -- the Hessian of the mean squared output error up to
    a factor 2 -- and ``mean()`` the mean input row, which bias correction needs.
    """

    def __init__(self, cols: int, device: Optional[torch.device] = None) -> None:
        self.xtx = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.xsum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, rows: Tensor) -> None:
        if rows.shape[-1] != self.xtx.shape[0]:
            raise ValueError(
                f"input has {rows.shape[-1]} features, the statistics hold {self.xtx.shape[0]}"
            )
        for chunk in rows.split(CHUNK_ROWS):
            c = chunk.float()
            self.xtx += (c.T @ c).double()
            self.xsum += c.sum(dim=0).double()
        self.rows += rows.shape[0]

    def hessian(self) -> Tensor:
        self._check_rows()
        return self.xtx / self.rows

    def mean(self) -> Tensor:
        self._check_rows()
        return self.xsum / self.rows

    def _check_rows(self) -> None:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer (all padding, or never run)")


def layer_columns(module: nn.Module) -> int:
    """Width of the layer's weight seen as a matrix: the length of one input row."""
    return matrix_shape(module)[1]


def capture_grams(
    model: nn.Module, layers: Mapping[str, nn.Module], calib: Iterable
) -> dict[str, Gram]:
    """One pass over ``calib`` (eval mode, no grad) accumulating each layer's :class:`Gram`."""
    grams: dict[str, Gram] = {}
    state: dict[str, Optional[Tensor]] = {"attention_mask": None}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = input_rows(module, args[0].detach(), state["attention_mask"])
            if name not in grams:
                grams[name] = Gram(layer_columns(module), rows.device)
            grams[name].add(rows)

        return hook

    register = lambda n, m: m.register_forward_pre_hook(make_hook(n))  # noqa: E731
    _run_with_hooks(model, layers, calib, state, grams, register)
    return grams
