"""BatchNorm recalibration: running statistics that describe the pruned model, not the dense one.

Pruning changes every activation downstream of a pruned layer, so the running means and variances
a BatchNorm layer learned on the dense model normalise the pruned model's activations wrongly
(often the larger part of the accuracy lost at moderate sparsity). Re-estimating them on a little
data recovers that without touching a weight.

The statistics are the exact population mean and (unbiased) variance of each layer's input over
all of ``calib``, accumulated per batch with Chan's pairwise update in float64. ``momentum=None``
would instead average per-batch means with equal weight (off when the last batch is short) and
average per-batch variances (missing the spread between batch means).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .._progress import bar_disabled
from ..calibration import check_calib, iter_batches
from ..calibration.capture import eval_mode, model_device


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None
        self.calls = 0

    def add(self, x: Tensor) -> None:
        # Channels on dim 1 for (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W).
        x = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        n = x.shape[1]
        mean = x.mean(dim=1)
        m2 = (x - mean[:, None]).pow(2).sum(dim=1)
        self.calls += 1
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * n / total)
        self.count = total


def recalibrate_batchnorm(
    model: nn.Module, calib: Iterable, *, progress: Optional[bool] = None
) -> int:
    """Re-estimate the running statistics of every BatchNorm layer in ``model`` from ``calib``.

    Covers ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (subclasses included) that track running
    stats. ``calib`` follows the calibration protocol (tensors, ``(inputs, targets)`` pairs or
    dicts of keyword arguments; see :mod:`sparsenet.calibration`) and is read once, under
    ``no_grad``, with only the BatchNorm layers in train mode (they normalise with batch
    statistics, as in training; dropout and the rest run in eval mode). Afterwards each layer's
    ``running_mean`` / ``running_var`` are the mean and unbiased variance of its input over all of
    ``calib`` and ``num_batches_tracked`` the number of batches it saw; every module's training
    flag and momentum are as they were. Under ``torch.distributed`` each process uses its own
    data. If anything raises, the statistics are left as they were.

    Returns the number of layers recalibrated. Raises ValueError when the model has no such
    layer or the calibration forward never reaches one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }
    if not layers:
        raise ValueError(
            "model has no BatchNorm layers with track_running_stats=True to recalibrate"
        )
    check_calib(calib)

    moments = {name: _Moments() for name in layers}
    saved = {
        name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for name, m in layers.items()
    }
    momenta = [(m, m.momentum) for m in layers.values()]

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            moments[name].add(args[0])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with eval_mode(model):  # puts each module's training flag back afterwards
            for m in layers.values():
                m.train()
                m.momentum = 0.0  # the forward must not move the buffers; they are written below
            batches = tqdm(
                iter_batches(calib, model_device(model)),
                desc="recalibrating BatchNorm",
                unit="batch",
                leave=False,
                disable=bar_disabled(progress),
            )
            with torch.no_grad():
                for batch in batches:
                    model(*batch.args, **batch.kwargs)
        missing = [name for name in layers if moments[name].mean is None]
        if missing:
            raise ValueError(f"calibration forward never reached BatchNorm layers {missing}")
        with torch.no_grad():
            for name, m in layers.items():
                mom = moments[name]
                m.running_mean.copy_(mom.mean)
                m.running_var.copy_(mom.m2 / max(mom.count - 1, 1))
                m.num_batches_tracked.fill_(mom.calls)
    except BaseException:
        with torch.no_grad():
            for name, m in layers.items():
                mean, var, tracked = saved[name]
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, momentum in momenta:
            m.momentum = momentum
    return len(layers)
