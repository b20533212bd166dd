"""Train the kept weights of a block (mask fixed) so its outputs match the dense model's.

Layer-wise solvers fix each layer on its own; the non-linearities between them (attention's
softmax, GELU, normalisation) and the error already accumulated upstream are only seen when a
whole block is fitted to the dense block's outputs, fed the *pruned* model's inputs (EBFT,
Wanda++). Masks stay fixed because the pruned layers carry sparsenet's mask parametrization:
their pruned weights read zero and receive no gradient.

A small calibration set is easy to overfit, so the last batches are held out: after every
epoch the held-out loss decides whether to keep going (``patience``) and which epoch's weights
to keep. The weights the block came with count as epoch 0, so fitting never leaves the block
worse on held-out data than it found it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FitResult:
    epochs: int  # epochs run
    best_epoch: int  # the epoch whose weights were kept (0: the starting weights)
    before: float  # held-out loss (training loss when nothing is held out) at the start
    after: float  # ... of the weights kept


def relative_mse(output: Tensor, target: Tensor) -> Tensor:
    """``||out - target||² / ||target||²``: scale-free, so one learning rate fits every block."""
    return (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def cosine_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean ``1 - cos`` between each sample's flattened output and the dense one."""
    a, b = output.reshape(output.shape[0], -1), target.reshape(target.shape[0], -1)
    return (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()


def kl_loss(output: Tensor, target: Tensor) -> Tensor:
    """KL(dense || pruned) of the softmax over the last dim (logits), mean over rows."""
    log_p = F.log_softmax(output.float(), dim=-1).reshape(-1, output.shape[-1])
    log_q = F.log_softmax(target.float(), dim=-1).reshape(-1, target.shape[-1])
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": relative_mse,
    "cosine": cosine_loss,
    "kl": kl_loss,
}


def check_holdout(holdout: object) -> float:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    return float(holdout)


def holdout_split(n_batches: int, holdout: float) -> tuple[list[int], list[int]]:
    """Train and held-out batch indices: the last ``ceil(holdout * n)`` batches are held out,
    none when there are fewer than two batches (early stopping then reads the training loss)."""
    holdout = check_holdout(holdout)
    n_out = min(n_batches - 1, math.ceil(holdout * n_batches)) if n_batches >= 2 else 0
    return list(range(n_batches - n_out)), list(range(n_batches - n_out, n_batches))


def fit(
    params: Sequence[nn.Parameter],
    forward: Callable[[int], Tensor],
    targets: Sequence[Tensor],
    *,
    loss: Callable[[Tensor, Tensor], Tensor] = relative_mse,
    epochs: int = 5,
    lr: float = 1e-4,
    holdout: float = 0.2,
    patience: int = 1,
    seed: int = 0,
) -> FitResult:
    """Adam on ``params`` so that ``forward(i)`` matches ``targets[i]`` for every batch ``i``.

    ``forward`` runs with gradients enabled; the caller keeps the model in eval mode (no
    dropout). Stops after ``epochs``, or once the held-out loss has not improved for
    ``patience`` epochs; the best epoch's parameters are restored. A non-finite loss stops the
    fit and restores the best weights so far.
    """
    params = [p for p in params if p.requires_grad]
    train, held = holdout_split(len(targets), holdout)
    watch = held or train

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(loss(forward(i), targets[i])) for i in watch) / len(watch)

    best = evaluate()
    before, best_epoch, stale, run = best, 0, 0, 0
    if not params or epochs <= 0 or not math.isfinite(best):
        return FitResult(0, 0, before, best)
    best_state = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    try:
        for epoch in range(1, epochs + 1):
            run = epoch
            finite = True
            with torch.enable_grad():
                for j in torch.randperm(len(train), generator=gen).tolist():
                    i = train[j]
                    value = loss(forward(i), targets[i])
                    if not torch.isfinite(value):
                        finite = False
                        break
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    opt.step()
            score = evaluate() if finite else math.inf
            if score < best:
                best, best_epoch, stale = score, epoch, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= patience or not finite:
                    break
    finally:
        for p in params:  # the fit leaves no gradients behind, however it ends
            p.grad = None
    if best_epoch != run:
        # The last epoch was not the best: put the best (or the starting) weights back.
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    return FitResult(run, best_epoch, before, best)
