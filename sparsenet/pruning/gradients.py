"""Gradient pass for the Taylor criterion: sum over calibration batches of |w * dL/dw|.

Gradients are taken with ``torch.autograd.grad`` on the layers' underlying weights, so no
``.grad`` is left on the model and ``requires_grad`` flags are restored afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import Batch, eval_mode, iter_batches
from ..calibration.capture import model_device
from ..calibration.outputs import model_output
from .._weights import stored_weight
from .masks import effective_weight_and_mask

LossFn = Callable[[Any, Any], Tensor]


def default_loss(output: Any, batch: Batch) -> Tensor:
    """Cross-entropy of the output's logits against the batch's targets (``-100`` ignored)."""
    if batch.targets is None:
        raise ValueError(
            "the default loss (cross-entropy) needs targets, but a calib batch has none; pass "
            "(inputs, targets) batches, a 'labels' entry, or loss_fn=callable(output, batch)"
        )
    logits, targets = model_output(output), batch.targets
    classes = logits.shape[-1]
    if targets.shape == logits.shape:  # class probabilities
        return F.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1, classes))
    return F.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1))


def taylor_scores(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable,
    loss_fn: Optional[LossFn] = None,
) -> dict[str, Tensor]:
    """Weight-shaped ``sum_b |w * dL_b/dw|`` per layer, ``L_b`` the loss of calibration batch b.

    ``loss_fn(output, batch)`` gets the batch as it is in ``calib`` (on the model's device);
    without it, :func:`default_loss`. Summing per-batch magnitudes (not the magnitude of the
    summed gradient) keeps weights whose gradients cancel across batches from looking idle.
    Raises ValueError on a non-scalar loss or a NaN/Inf gradient.

    Memory: each weight's gradient is folded into its accumulator by a post-accumulate hook and
    freed at once, so no full set of gradients ever sits beside the accumulators; parameters that
    are not scored do not get gradients at all. The model's ``.grad`` and ``requires_grad`` are
    as they were afterwards.
    """
    weights = {name: stored_weight(m) for name, m in layers.items()}
    scored = {id(w) for w in weights.values()}
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params] + [
        (w, w.requires_grad, w.grad) for w in weights.values() if all(w is not p for p in params)
    ]
    acc = {name: torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
           for name, w in weights.items()}
    reached: set[str] = set()
    bad: list[str] = []

    def fold(name: str, module: nn.Module):
        def hook(param: Tensor) -> None:
            g, param.grad = param.grad, None
            reached.add(name)
            if not torch.isfinite(g).all():
                bad.append(name)
                return
            w, _ = effective_weight_and_mask(module)
            acc[name].add_((w * g).abs())

        return hook

    handles = []
    try:
        for p, _, _ in flags:
            p.grad = None
            p.requires_grad_(id(p) in scored)
        # (hooks only attach to tensors that require grad, hence after the flags)
        handles = [weights[name].register_post_accumulate_grad_hook(fold(name, m)) for name, m in layers.items()]
        with eval_mode(model):
            for i, batch in enumerate(iter_batches(calib, model_device(model))):
                output = model(*batch.args, **batch.kwargs)
                if loss_fn is None:
                    loss = default_loss(output, batch)
                else:
                    loss = loss_fn(output, batch.raw)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
                reached.clear()
                loss.backward()
                if bad:  # name the first such layer in model order (backward visits them last first)
                    first = next(name for name in layers if name in bad)
                    raise ValueError(f"NaN or Inf gradient for layer {first!r} on calibration batch #{i}")
                missing = [name for name in layers if name not in reached]
                if missing:
                    raise ValueError(f"layer {missing[0]!r} gets no gradient from the loss")
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
    return acc
