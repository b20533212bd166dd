"""Forward-hook capture of per-layer input and output statistics.

Each hook reduces its layer's input to a small statistic the moment it sees it and keeps
nothing else, so one layer's activation is the most that is ever held beyond what the forward
pass itself holds; all layers are watched in the same pass, so ``calib`` is read once.
Hooks are always removed and training flags restored, even when a batch raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from .data import iter_batches


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then each module's own ``training`` flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    return None


def _token_rows(x: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Linear input as (tokens, features), with padding tokens (mask == 0) dropped.

    The mask applies only where the input's leading dims are the mask's (batch, seq) shape;
    inputs that already pooled the sequence (a classifier on [CLS]) keep every row.
    """
    if attention_mask is not None and tuple(x.shape[:-1]) == tuple(attention_mask.shape):
        x = x[attention_mask.to(x.device) != 0]
    return x.reshape(-1, x.shape[-1])


def _sq_norm_and_count(module: nn.Module, x: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, int]:
    """Sum of x**2 per input feature/channel and how many values each sum holds."""
    # float32 accumulation: bf16/fp16 activations squared and summed over many tokens overflow
    # or lose every small term.
    if isinstance(module, nn.Conv2d):
        # Per input channel over batch and all pixels; attention masks do not apply to images.
        if x.dim() == 3:
            return x.float().pow(2).sum((1, 2)), x[0].numel()
        return x.float().pow(2).sum(dim=(0, 2, 3)), x.shape[0] * x[0, 0].numel()
    rows = _token_rows(x, attention_mask)
    return rows.float().pow(2).sum(dim=0), rows.shape[0]


def check_rows_seen(counts: Mapping[str, int]) -> None:
    """Refuse statistics gathered from no data: ``counts`` maps what watched the data (``"layer
    'fc1'"``) to the rows it saw.

    With no rows (every batch empty, or every token padding) the sums are all zero, which a
    criterion would read as "every weight equally unimportant" and prune by position.
    """
    empty = [what for what, c in counts.items() if c == 0]
    if empty:
        raise ValueError(
            f"no calibration data reached {', '.join(empty)}: every batch had no rows or only padding "
            "tokens (attention_mask all 0); pass batches with data"
        )


def _check_layers_saw_rows(counts: Mapping[str, int], layers: Mapping[str, nn.Module]) -> None:
    check_rows_seen({f"layer {n!r}": counts.get(n, 0) for n in layers})


def capture_input_sq_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], calib: Iterable
) -> dict[str, Tensor]:
    """Squared L2 norm of each layer's input per input feature, summed over all of ``calib``.

    ``nn.Linear`` (and Hugging Face's Conv1D): shape ``(in_features,)``, ``sum over tokens of
    x[t, j]**2`` (padding tokens excluded when the batch has an ``attention_mask``).
    ``nn.Conv2d``: shape ``(in_channels,)``, ``x[b, c, h, w]**2`` summed over batch and pixels -- each input value counted once, not once
    per kernel tap, so it matches the unfolded (im2col) column norms up to border effects and
    stride. Runs the model in eval mode under ``no_grad``; a layer never reached raises, as does a
    layer that saw no rows (empty batches, or every token padding).
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, Optional[Tensor]] = {"attention_mask": None}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            s, c = _sq_norm_and_count(module, args[0].detach(), state["attention_mask"])
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + c

        return hook

    _run_with_hooks(model, layers, calib, state, sums, lambda n, m: m.register_forward_pre_hook(make_hook(n)))
    _check_layers_saw_rows(counts, layers)
    return sums


def _run_with_hooks(model, layers, calib, state, sums, register) -> None:
    """One pass over ``calib`` (eval mode, no grad) with ``register(name, module)`` hooks on every
    layer, always removed; ``state["attention_mask"]`` follows the batch. Raises if a layer's
    hook never filled ``sums``."""
    handles = [register(n, m) for n, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in iter_batches(calib, model_device(model)):
                state["attention_mask"] = batch.kwargs.get("attention_mask")
                model(*batch.args, **batch.kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"calibration forward never reached layers {missing}")


def _abs_sum_and_count(
    module: nn.Module, y: Tensor, attention_mask: Optional[Tensor]
) -> tuple[Tensor, int]:
    """Sum of |y| per output channel/feature and how many values each sum holds."""
    y = y.float().abs()  # float32 accumulation, as for the input norms
    if isinstance(module, nn.Conv2d):
        # Channels on dim 0 of an unbatched (C, H, W) output, else on dim 1; every pixel counts.
        if y.dim() == 3:
            return y.sum(dim=(1, 2)), y[0].numel()
        return y.sum(dim=(0, 2, 3)), y.shape[0] * y[0, 0].numel()
    rows = _token_rows(y, attention_mask)
    return rows.sum(dim=0), rows.shape[0]


def capture_output_abs_means(
    model: nn.Module, layers: Mapping[str, nn.Module], calib: Iterable
) -> dict[str, Tensor]:
    """Mean absolute output of each layer per output feature/channel, over all of ``calib``.

    ``nn.Linear`` (and Conv1D): shape ``(out_features,)``, mean over tokens of ``|y[t, o]|``
    (padding tokens excluded when the batch has an ``attention_mask``). ``nn.Conv2d``: shape
    ``(out_channels,)``, mean of ``|y[b, o, h, w]|`` over batch and pixels. The output is the layer's own (bias
    included, current masks applied). One forward pass in eval mode under ``no_grad``; a layer
    never reached raises, as does a layer that saw no rows (empty batches, or every token padding).
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, Optional[Tensor]] = {"attention_mask": None}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            s, c = _abs_sum_and_count(module, output.detach(), state["attention_mask"])
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + c

        return hook

    _run_with_hooks(model, layers, calib, state, sums, lambda n, m: m.register_forward_hook(make_hook(n)))
    _check_layers_saw_rows(counts, layers)
    return {n: sums[n] / counts[n] for n in layers}
