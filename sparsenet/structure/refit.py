"""Refit the layers that read removed channels, so the smaller network keeps computing what the
original computed (ThiNet's least-squares refit of the next layer, with FLAP's bias compensation
falling out of it: the bias is refit with the weights).

For each consumer ``L`` (a Linear, Conv1D or ungrouped Conv2d whose inputs lost channels) the
calibration data runs through the shrunk model and through the original one, and its new weights
solve

    min_W'  E || W' x' + b' - (W x + b) ||²  (+ a little ridge damping)

where ``x'`` is ``L``'s input in the shrunk model (fewer features) and ``x`` its input in the original:
``[W' b']ᵀ = (X̃ᵀX̃ + λI)⁻¹ X̃ᵀX [W b]ᵀ`` with ``X̃ = [x' 1]``, ``X = [x 1]``. The mean contribution
of every removed channel lands in the bias; the rest is redistributed over the channels kept. Rows
of ``W`` whose outputs were removed themselves are left out of the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from tqdm.auto import tqdm

from .._progress import bar_disabled
from .._weights import as_matrix, from_matrix, stored_weight
from ..calibration import eval_mode, iter_batches
from ..calibration.capture import model_device
from ..calibration.gram import CHUNK_ROWS, input_rows
from ..calibration.outputs import model_output
from ..reconstruction.blockwise import LOSSES, fit, relative_mse
from ..reconstruction.stages import capture_inputs, find_stages, probe, run_stage

DEFAULT_DAMP = 1e-4


@dataclass
class RefitResult:
    """A consumer's output error relative to the original layer's output (calibration data),
    right after removal and after the refit."""

    layer: str
    error_before: float
    error_after: float


class _Moments:
    """``X̃ᵀX̃``, ``X̃ᵀX`` and ``XᵀX`` of one layer, inputs augmented with a constant 1 (float64)."""

    def __init__(self, n_shrunk: int, n_original: int) -> None:
        self.h = torch.zeros(n_shrunk + 1, n_shrunk + 1, dtype=torch.float64)
        self.c = torch.zeros(n_shrunk + 1, n_original + 1, dtype=torch.float64)
        self.g = torch.zeros(n_original + 1, n_original + 1, dtype=torch.float64)
        self.rows = 0

    def add(self, shrunk: Tensor, original: Tensor) -> None:
        if not (torch.isfinite(shrunk).all() and torch.isfinite(original).all()):
            raise ValueError("the calibration data drives a layer's inputs to NaN or Inf; check the batches")
        if shrunk.shape[0] != original.shape[0]:
            raise ValueError("the shrunk and the original model disagree on a layer's number of input rows")
        one = lambda t: torch.cat([t.float(), torch.ones(t.shape[0], 1)], dim=1)  # noqa: E731
        for s, o in zip(shrunk.split(CHUNK_ROWS), original.split(CHUNK_ROWS)):
            s, o = one(s.cpu()), one(o.cpu())
            self.h += (s.T @ s).double()
            self.c += (s.T @ o).double()
            self.g += (o.T @ o).double()
        self.rows += shrunk.shape[0]


def _weight_and_bias(module: nn.Module) -> Tensor:
    """``[W b]``: the layer's weight as an (out, in) matrix with its bias as one more column."""
    w = as_matrix(module, stored_weight(module).detach()).double().cpu()
    bias = getattr(module, "bias", None)
    b = bias.detach().double().cpu() if isinstance(bias, Tensor) else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b[:, None]], dim=1)


def _error(wb: Tensor, target: Tensor, m: _Moments) -> float:
    """``E||W'x' - Wx||²`` relative to ``E||Wx||²``, from the moments alone."""
    fit = torch.trace(wb @ m.h @ wb.T) - 2 * torch.trace(wb @ m.c @ target.T) + torch.trace(target @ m.g @ target.T)
    scale = torch.trace(target @ m.g @ target.T)
    return float(fit.clamp_min(0) / scale.clamp_min(1e-30))


def _solve(m: _Moments, target: Tensor, damp: float, has_bias: bool) -> Tensor:
    """``[W' b']`` minimising the error, ridge-damped relative to the mean diagonal of ``X̃ᵀX̃``."""
    n = m.h.shape[0] - 1 if not has_bias else m.h.shape[0]
    h, c = m.h[:n, :n], m.c[:n]
    scale = float(torch.diagonal(h).mean()) or 1.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h + damp * scale * torch.eye(n, dtype=h.dtype))
        if int(info) == 0:
            break
        damp = max(damp * 10.0, 1e-6)
    else:
        raise ValueError("the calibration inputs of a refit layer are degenerate even with damping")
    wb = torch.cholesky_solve(c @ target.T, factor).T
    if not has_bias:  # the constant column is not a free parameter: it stays 0
        wb = torch.cat([wb, torch.zeros(wb.shape[0], 1, dtype=wb.dtype)], dim=1)
    return wb


class _Stop(Exception):
    """Ends a forward pass once the layer being captured has seen its input."""


def _capture(shrunk: nn.Module, original: nn.Module, name: str, calib: Iterable) -> Optional[_Moments]:
    """Moments of layer ``name``'s inputs in both models over ``calib`` (None: never reached)."""
    moments: Optional[_Moments] = None
    rows: list[Optional[Tensor]] = [None, None]
    mask: list[Optional[Tensor]] = [None]

    def hook(side: int):
        def capture(module, args):
            rows[side] = input_rows(module, args[0].detach(), mask[0])
            raise _Stop
        return capture

    handles = [shrunk.get_submodule(name).register_forward_pre_hook(hook(0)),
               original.get_submodule(name).register_forward_pre_hook(hook(1))]
    try:
        with eval_mode(shrunk), eval_mode(original), torch.no_grad():
            for batch in iter_batches(calib, model_device(shrunk)):
                mask[0] = batch.kwargs.get("attention_mask")
                rows[0] = rows[1] = None
                for side, model in enumerate((shrunk, original)):
                    try:
                        model(*batch.args, **batch.kwargs)
                    except _Stop:
                        pass
                    except (RuntimeError, TypeError, IndexError) as e:
                        raise ValueError(f"a calibration batch does not run through the model: {e}") from e
                if rows[0] is None or rows[1] is None:
                    continue  # this batch never reached the layer (in one of the models)
                if moments is None:
                    moments = _Moments(rows[0].shape[1], rows[1].shape[1])
                moments.add(rows[0], rows[1])
    finally:
        for h in handles:
            h.remove()
    return moments


def refit_consumers(shrunk: nn.Module, original: nn.Module, consumers: dict[str, Tensor],
                    calib: Iterable, damp: float = DEFAULT_DAMP, progress: Optional[bool] = None) -> list[RefitResult]:
    """Refit each layer named in ``consumers`` (layer name -> the original layer's output rows it
    kept) of ``shrunk`` against the same-named layer of ``original`` on ``calib``; in place.

    Sequential, in module order: each layer is fit on the inputs the already refit layers before it
    produce, so it also absorbs what their refits could not recover (one pass over the data per
    layer, each stopped at that layer). ``progress``: True / False force the bar on / off; None
    shows it when stderr is a terminal.
    """
    order = [name for name, _ in shrunk.named_modules() if name in consumers]
    results = []
    for name in tqdm(order, desc="refit", unit="layer", disable=bar_disabled(progress), leave=False):
        m = _capture(shrunk, original, name, calib)
        if m is None:
            continue  # never reached by the calibration data: left as removal made it
        layer = shrunk.get_submodule(name)
        target = _weight_and_bias(original.get_submodule(name))[consumers[name]]
        before = _weight_and_bias(layer)
        has_bias = isinstance(getattr(layer, "bias", None), Tensor)
        wb = _solve(m, target, damp, has_bias)
        with torch.no_grad():
            weight = stored_weight(layer)
            weight.copy_(from_matrix(layer, wb[:, :-1]).to(weight.dtype).reshape(weight.shape))
            if has_bias:
                layer.bias.copy_(wb[:, -1].to(layer.bias.dtype))
        results.append(RefitResult(name, _error(before, target, m), _error(wb, target, m)))
    return results


def fit_outputs(shrunk: nn.Module, original: nn.Module, params: list[nn.Parameter], calib: Iterable,
                loss: str, epochs: int, lr: float, holdout: float = 0.2, seed: int = 0):
    """Adam on ``params`` (the shrunk layers') so the shrunk model's output matches the original's
    on ``calib``, the last batches held out for early stopping (reconstruction's block fit, on the
    whole model): what the layer-wise refits cannot see -- the non-linearities between layers, the
    errors that add up through them -- is fit here."""

    batches = list(iter_batches(calib, model_device(shrunk)))
    with eval_mode(original), torch.no_grad():
        targets = [model_output(original(*b.args, **b.kwargs)).detach() for b in batches]

    def forward(i: int) -> Tensor:
        return model_output(shrunk(*batches[i].args, **batches[i].kwargs))

    with eval_mode(shrunk):
        return fit(params, forward, targets, loss=LOSSES[loss], epochs=epochs, lr=lr, holdout=holdout, seed=seed)


def fit_blocks(shrunk: nn.Module, original: nn.Module, layers: list[str], calib: Iterable, epochs: int,
               lr: float, holdout: float = 0.2, seed: int = 0) -> list:
    """Each block (transformer layer, residual block: reconstruction's automatic stages) holding a
    layer in ``layers``, in execution order: Adam on its parameters so its output on the shrunk
    model's own inputs matches the original block's output on the original's (EBFT / Wanda++, as in
    ``sparsenet.reconstruct``), the last batches held out for early stopping. Sees what the
    least-squares refits cannot: the non-linearities inside the block. A block whose output itself
    lost channels (a shrunk residual stream) has no target to fit and is skipped. Returns
    (name, FitResult) per block fitted."""

    modules = dict(shrunk.named_modules())
    stages = probe(shrunk, find_stages(shrunk, {n: modules[n] for n in layers if n in modules}), calib)
    results = []
    for stage in stages:
        if len(stage.layers) < 2:
            continue  # a lone layer: its least-squares refit is already its optimum
        inputs = capture_inputs(shrunk, stage.module, calib)
        dense = original.get_submodule(stage.name)
        targets = run_stage(dense, capture_inputs(original, dense, calib))
        if not inputs or run_stage(stage.module, inputs[:1])[0].shape != targets[0].shape:
            continue  # the block's own output lost channels (a shrunk residual stream): no target

        def forward(i: int, module=stage.module, inputs=inputs) -> Tensor:
            return model_output(module(*inputs[i].args, **inputs[i].kwargs))

        params = [p for p in stage.module.parameters() if p.requires_grad]
        with eval_mode(stage.module):
            results.append((stage.name, fit(params, forward, targets, loss=relative_mse, epochs=epochs, lr=lr,
                                            holdout=holdout, seed=seed)))
    return results
