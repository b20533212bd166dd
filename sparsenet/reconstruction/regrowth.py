"""RigL regrowth: let fine-tuning move each layer's kept weights to where the loss wants them.

Every ``every`` steps each masked layer drops its k smallest-magnitude kept weights and grows the
k pruned positions whose dense gradient is largest (Evci et al., "Rigging the Lottery", 2020),
k a cosine-decayed fraction of the layer's kept count. Each layer's kept count never changes, so
the sparsity pruning chose holds; only where the weights sit moves.

The dense gradient is the gradient with respect to the *effective* weight, pruned positions
included. The mask parametrization's ``where()`` gives the stored original a zero gradient at
pruned positions, so it is read from the parametrization's output instead, only on update steps.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..pruning.masks import find_weight_mask

_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class RegrowthUpdate:
    """One mask update: its step, the drop fraction in force, and weights moved per layer."""

    step: int
    drop_fraction: float
    moved: dict[str, int] = field(default_factory=dict)


def regrow_layer(
    module: nn.Module,
    dense_grad: Tensor,
    k: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> tuple[Tensor, Tensor]:
    """Drop ``module``'s k smallest-|w| kept weights and grow the k pruned positions with the
    largest ``|dense_grad|``, in place; returns the flat indices ``(dropped, grown)``.

    Only positions pruned *before* this call can grow, so a weight is never dropped and regrown
    at once. Grown weights start at 0 (the stored original is zeroed there) and, when
    ``optimizer`` holds Adam-style moments for the weight, those are zeroed too, so no stale
    momentum from before the drop pushes them. The mask buffer is updated in place: whatever
    holds it (a Pruner) sees the new mask. Ties go to the lower flat index.
    """
    wm = find_weight_mask(module)
    if wm is None:
        raise ValueError("module has no sparsenet mask on `weight` (prune it with sparsenet.prune)")
    mask = wm.mask
    if dense_grad.shape != mask.shape:
        raise ValueError(f"dense_grad has shape {tuple(dense_grad.shape)}, the mask {tuple(mask.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if not torch.isfinite(dense_grad).all():
        raise ValueError("dense_grad contains NaN or Inf")
    flat = mask.view(-1)
    active = flat.clone()
    k = min(int(k), int(active.sum()), int((~active).sum()))
    empty = torch.empty(0, dtype=torch.long, device=mask.device)
    if k == 0:
        return empty, empty

    original = module.parametrizations["weight"].original
    with torch.no_grad():
        inf = torch.tensor(float("inf"), device=mask.device)
        magnitude = torch.where(active, original.detach().view(-1).abs().float(), inf)
        dropped = torch.argsort(magnitude, stable=True)[:k]
        growth = torch.where(active, -inf, dense_grad.detach().reshape(-1).abs().float().to(mask.device))
        grown = torch.argsort(growth, descending=True, stable=True)[:k]

        flat[dropped] = False
        flat[grown] = True
        original.view(-1)[grown] = 0
        state = optimizer.state.get(original, {}) if optimizer is not None else {}
        for key in _ADAM_STATE:
            moment = state.get(key)
            if isinstance(moment, Tensor) and moment.shape == original.shape:
                moment.view(-1)[grown] = 0
    return dropped, grown


class RigL:
    """RigL drop-and-grow settings; pass to ``finetune(regrow=RigL(...))``.

    Args:
        drop_fraction: fraction of each layer's kept weights moved at step 0, in (0, 1); it
            decays as ``drop_fraction / 2 * (1 + cos(pi * step / end))``.
        every: steps between mask updates (updates at ``every, 2 * every, ...``).
        end: the step from which the mask stays fixed; ``None``: the number of steps the
            fine-tuning run takes.

    On an update step the mask update replaces that step's optimizer update (as in the paper),
    so the magnitudes dropped and the gradients grown come from the same weights.
    """

    def __init__(self, drop_fraction: float = 0.3, every: int = 50, end: Optional[int] = None) -> None:
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, numbers.Real) or not (
            0.0 < float(drop_fraction) < 1.0
        ):
            raise ValueError(f"drop_fraction must be a float in (0, 1), got {drop_fraction!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if end is not None and (isinstance(end, bool) or not isinstance(end, numbers.Integral) or end < 1):
            raise ValueError(f"end must be a positive int or None, got {end!r}")
        self.drop_fraction, self.every, self.end = float(drop_fraction), int(every), end

    def fraction_at(self, step: int, end: int) -> float:
        """The drop fraction at ``step`` of a run whose updates stop at ``end``."""
        if step >= end:
            return 0.0
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / end))

    def attach(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        total_steps: Optional[int] = None,
    ) -> "RigLUpdater":
        """Bind to ``model``'s masked, trainable layers (and ``optimizer``'s state) for a run."""
        end = self.end if self.end is not None else total_steps
        if end is None:
            raise ValueError(
                "RigL needs end=... when the number of training steps is unknown "
                "(data without len() and no max_steps)"
            )
        layers = {
            name: m
            for name, m in model.named_modules()
            if find_weight_mask(m) is not None and m.parametrizations["weight"].original.requires_grad
        }
        if not layers:
            raise ValueError("regrowth needs layers masked by sparsenet.prune with trainable weights")
        return RigLUpdater(self, layers, optimizer, int(end))

    def __repr__(self) -> str:
        return f"RigL(drop_fraction={self.drop_fraction}, every={self.every}, end={self.end})"


class RigLUpdater:
    """A :class:`RigL` bound to a model for one run. In a training loop::

        with updater.watch(step):          # records dense gradients on update steps
            loss_of(batch).backward()
        if updater.is_update(step):
            updater.update(step)           # instead of optimizer.step()
        else:
            optimizer.step()
    """

    def __init__(self, rigl: RigL, layers: dict[str, nn.Module], optimizer, end: int) -> None:
        self.rigl, self.layers, self.optimizer, self.end = rigl, layers, optimizer, end
        self.history: list[RegrowthUpdate] = []
        self._grads: dict[str, Tensor] = {}

    def is_update(self, step: int) -> bool:
        return step % self.rigl.every == 0 and step < self.end

    @contextmanager
    def watch(self, step: int) -> Iterator[None]:
        """On an update step, capture each layer's dense weight gradient during the block."""
        self._grads = {}
        if not self.is_update(step):
            yield
            return

        def make_hook(name: str):
            def accumulate(grad: Tensor) -> None:
                g = grad.detach()
                self._grads[name] = g.clone() if name not in self._grads else self._grads[name] + g

            def hook(plist: nn.Module, args: tuple, weight: Tensor) -> None:
                if weight.requires_grad:
                    weight.register_hook(accumulate)

            return hook

        # Hooks on the parametrization list fire each time the layer reads its weight.
        handles = [
            m.parametrizations["weight"].register_forward_hook(make_hook(name))
            for name, m in self.layers.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def update(self, step: int) -> RegrowthUpdate:
        """Move each layer's weights with the gradients :meth:`watch` captured at ``step``."""
        if not self.is_update(step):
            raise ValueError(f"step {step} is not a regrowth step")
        missing = [name for name in self.layers if name not in self._grads]
        if missing:
            raise ValueError(f"layer {missing[0]!r} got no gradient on regrowth step {step}")
        fraction = self.rigl.fraction_at(step, self.end)
        moved = {}
        for name, module in self.layers.items():
            kept = int(find_weight_mask(module).mask.sum())
            dropped, _ = regrow_layer(module, self._grads[name], round(fraction * kept), self.optimizer)
            moved[name] = int(dropped.numel())
        self._grads = {}
        record = RegrowthUpdate(step, fraction, moved)
        self.history.append(record)
        return record
