"""Importance criteria: how much each weight of a layer is worth keeping.

A criterion is any callable ``(layer, ctx) -> Tensor`` that returns one score per weight (same
shape as ``layer.weight``, in its layout: ``(in, out)`` for Hugging Face's Conv1D); lower scores
are pruned first. Criteria only score: they never pick counts or shapes, so every criterion works
with every structure and scope.

A criterion that needs data first (activations, gradients) also has ``prepare(ctx)``: it runs
once, before any layer is scored, reads ``ctx.model`` / ``ctx.layers`` / ``ctx.calib`` /
``ctx.loss_fn`` and leaves what it computed in ``ctx.stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from .._weights import as_matrix, from_matrix, matrix_shape, weight_shape
from ..calibration import capture_input_sq_norms, capture_output_abs_means, check_calib
from .gradients import LossFn, taylor_scores


@dataclass(frozen=True)
class Layer:
    """What a criterion may look at for one prunable layer."""

    name: str
    module: nn.Module
    weight: Tensor  # effective (already masked) weight, detached
    mask: Optional[Tensor]  # current keep-mask when the layer is already pruned, else None


@dataclass
class ScoreContext:
    """State shared by all layers of one pruning call.

    Kept as an object so later criteria (gradients, activation statistics) add fields here
    instead of changing every criterion's signature.
    """

    # None draws from the global RNG, so torch.manual_seed still applies.
    generator: Optional[torch.Generator] = None
    model: Optional[nn.Module] = None
    layers: Mapping[str, nn.Module] = field(default_factory=dict)
    calib: Optional[Iterable] = None
    loss_fn: Optional[LossFn] = None
    stats: dict[str, Any] = field(default_factory=dict)  # what prepare() computed

    def require_calib(self, criterion: str) -> Iterable:
        if self.calib is None:
            raise ValueError(
                f"criterion {criterion!r} needs calibration data: pass calib=[batches] "
                "(tensors, (inputs, targets) pairs or dicts of keyword arguments)"
            )
        check_calib(self.calib)
        if self.model is None:
            raise ValueError(f"criterion {criterion!r} needs ctx.model to run calib through")
        return self.calib


Criterion = Callable[[Layer, ScoreContext], Tensor]
Prepare = Callable[[ScoreContext], None]

_CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str, prepare: Optional[Prepare] = None
) -> Callable[[Criterion], Criterion]:
    """Decorator that makes ``fn`` available as ``criterion=name``; ``prepare`` becomes
    ``fn.prepare`` (run once per pruning call, before scoring)."""

    def deco(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        if prepare is not None:
            fn.prepare = prepare
        _CRITERIA[name] = fn
        return fn

    return deco


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(criterion: str | Criterion) -> Criterion:
    """Resolve a name (or pass a callable through); unknown names list the known ones."""
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in _CRITERIA:
        return _CRITERIA[criterion]
    raise ValueError(
        f"unknown criterion {criterion!r}; known criteria: {', '.join(available_criteria())}"
    )


@register_criterion("magnitude")
def magnitude(layer: Layer, ctx: ScoreContext) -> Tensor:
    """|w|. Per weight, L1 and L2 magnitude rank identically; for groups (channels, blocks)
    the structure's ``norm`` ("l1" or "l2") picks how the |w| of a group combine."""
    # Raw |w|, not normalised per layer: global scope must compare magnitudes across layers.
    return layer.weight.abs()


@register_criterion("random")
def random(layer: Layer, ctx: ScoreContext) -> Tensor:
    # Draw on CPU so one seeded generator gives the same masks on any device; drawn as the
    # weight matrix, so a Conv1D gets the masks of the Linear it is.
    scores = torch.rand(matrix_shape(layer.module), generator=ctx.generator, dtype=torch.float32)
    return from_matrix(layer.module, scores).to(layer.weight.device)


def _prepare_wanda(ctx: ScoreContext) -> None:
    calib = ctx.require_calib("wanda")
    ctx.stats["input_sq_norms"] = capture_input_sq_norms(ctx.model, ctx.layers, calib)


def _input_norms_per_weight(module: nn.Module, sq_norms: Tensor) -> Tensor:
    """||X_j||_2 of the input each weight reads, broadcastable to the ``(out, in * kernel)``
    weight matrix (input feature / channel j of each weight)."""
    norms = sq_norms.sqrt()
    if isinstance(module, nn.Conv2d):
        out_ch, in_per_group, kh, kw = weight_shape(module)
        g = module.groups
        # Output channel o of group k reads input channels k*in_per_group ... (k+1)*in_per_group,
        # each through all kh * kw taps (the matrix's columns are ordered (channel, kh, kw)).
        per_out = norms.view(g, 1, in_per_group, 1).expand(g, out_ch // g, in_per_group, kh * kw)
        return per_out.reshape(out_ch, in_per_group * kh * kw)
    return norms.unsqueeze(0)


def wanda_scores(module: nn.Module, weight: Tensor, sq_norms: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2`` from the summed squared inputs ``sq_norms`` of ``module``, in the
    weight's layout."""
    # At least float32: half-precision products of |w| and large norms overflow.
    dtype = torch.promote_types(weight.dtype, torch.float32)
    norms = _input_norms_per_weight(module, sq_norms.to(weight.device, dtype))
    return from_matrix(module, as_matrix(module, weight.abs().to(dtype)) * norms)


@register_criterion("wanda", prepare=_prepare_wanda)
def wanda(layer: Layer, ctx: ScoreContext) -> Tensor:
    """Activation-aware (Wanda): ``|W_ij| * ||X_j||_2`` over the calibration inputs of the layer.

    Needs ``calib``; see :func:`sparsenet.calibration.capture_input_sq_norms` for what X_j is
    (padding tokens excluded; per input channel for Conv2d).
    """
    return wanda_scores(layer.module, layer.weight, ctx.stats["input_sq_norms"][layer.name])


def _prepare_taylor(ctx: ScoreContext) -> None:
    calib = ctx.require_calib("taylor")
    ctx.stats["taylor"] = taylor_scores(ctx.model, ctx.layers, calib, ctx.loss_fn)


@register_criterion("taylor", prepare=_prepare_taylor)
def taylor(layer: Layer, ctx: ScoreContext) -> Tensor:
    """First-order Taylor: ``sum over calibration batches of |w * dL/dw|``.

    Needs ``calib``; the loss is ``loss_fn(output, batch)`` or cross-entropy against the
    batch's targets (see :func:`sparsenet.pruning.gradients.taylor_scores`).
    """
    return ctx.stats["taylor"][layer.name]


def _prepare_activation(ctx: ScoreContext) -> None:
    calib = ctx.require_calib("activation")
    ctx.stats["output_abs_means"] = capture_output_abs_means(ctx.model, ctx.layers, calib)


@register_criterion("activation", prepare=_prepare_activation)
def activation(layer: Layer, ctx: ScoreContext) -> Tensor:
    """Mean absolute output activation of each output channel/neuron over ``calib``.

    Every weight of output row o scores that row's mean |y_o| (see
    :func:`sparsenet.calibration.capture_output_abs_means`: padding tokens excluded; Conv2d over
    batch and pixels), so ``structure="channel"`` ranks channels by it; other structures see it
    broadcast. Needs ``calib``.
    """
    means = ctx.stats["output_abs_means"][layer.name].to(layer.weight.device)
    rows = means.view(-1, 1).expand(matrix_shape(layer.module))  # output o is row o
    # A real copy, not a stride-0 view: planning may fill pruned positions in place.
    return from_matrix(layer.module, rows).contiguous()
