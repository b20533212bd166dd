"""How many output positions each prunable layer computes per input sample, measured with hooks.

A layer's multiply-adds per output position equal its weight's element count, for ``nn.Linear``
and Hugging Face's ``Conv1D`` (one position = one row of its input: a token, or the whole sample
for a 2-D input) and for ``nn.Conv2d`` (one position = one output pixel; groups are already in
the weight's shape). So ``FLOPs per sample = 2 * weights * positions`` dense,
``2 * kept weights * positions`` pruned. Positions depend on the input (a convolution's output
size, a sequence's length), hence they are measured by running one example batch rather than
guessed from the module.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._weights import linear_features
from ..calibration import eval_mode, split_batch
from ..calibration.capture import model_device
from ..calibration.data import _to


def _samples(args: tuple, kwargs: dict) -> int:
    """Samples in a batch: the leading size of the first tensor passed to the model."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the example batch holds no tensor with a batch dimension")


def output_positions(
    model: nn.Module, layers: Mapping[str, nn.Module], example: Any
) -> dict[str, float]:
    """Output positions per sample of each layer in ``layers`` when ``model`` runs ``example``.

    ``example`` is one batch in the calibration protocol (a tensor, an ``(inputs, targets)``
    pair or a dict of keyword arguments); its first tensor's leading size is the number of
    samples. Positions are averaged over those samples, so padding tokens count (they are
    computed, after all). Layers the forward pass never reaches get 0 positions. Runs in eval
    mode under ``no_grad``; hooks are removed even when the forward raises.
    """
    batch = split_batch(_to(example, model_device(model) or torch.device("cpu")))
    samples = _samples(batch.args, batch.kwargs)
    rows: dict[str, int] = {name: 0 for name in layers}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                # (N, C_out, H, W) or unbatched (C_out, H, W): every pixel of every map.
                rows[name] += output.numel() // module.out_channels
            else:
                rows[name] += args[0].numel() // linear_features(module)[1]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(*batch.args, **batch.kwargs)
    finally:
        for h in handles:
            h.remove()
    # Whole numbers stay ints, so FLOP counts print and compare exactly.
    return {name: n // samples if n % samples == 0 else n / samples for name, n in rows.items()}
