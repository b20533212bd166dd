"""The sequential walk: stage by stage, each fed the already-pruned model's own outputs.

For every stage, in execution order:

1. its inputs -- from the previous stage's outputs when chained, else by replaying the model
   up to it -- for the pruned model, and (when a dense reference is needed) for a dense copy;
2. layer-wise solves, group by group (layers reading the same input, such as q/k/v, form a
   group): the group's input statistics are gathered from the stage as pruned so far, so each
   layer compensates for the layers solved before it; with ``correct=True`` the target is the
   dense layer's output on the *dense* inputs, so each solve also absorbs the error pruning
   caused upstream (least squares with the cross moment ``X̃ᵀX``);
3. optional block-wise fitting of the kept weights to the dense stage's outputs;
4. its outputs, which feed the next stage.

Only one stage's activations (inputs and outputs, pruned and dense) are held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .._weights import weight_shape
from ..calibration.capture import check_rows_seen, eval_mode
from ..calibration.gram import CHUNK_ROWS, Gram, input_rows, layer_columns
from .blockwise import FitResult, fit, relative_mse
from .layerwise import LayerResult, current_keep, install, problem_for, solve
from .solvers import LayerProblem
from ..calibration.outputs import model_output
from .stages import Stage, StageInput, _Stop, capture_inputs, chain, run_stage


@dataclass
class WalkSettings:
    method: str
    structure: object
    sparsities: Optional[dict[str, float]]  # None: keep the layers' masks
    damp: float
    within_stage: str  # "sequential" | "parallel"
    correct: bool
    blockwise: bool
    epochs: int
    lr: float
    holdout: float
    patience: int
    seed: int


@dataclass
class StageResult:
    name: str
    layers: int
    fit: Optional[FitResult] = None


@dataclass
class WalkResult:
    layers: list[LayerResult] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)


class _Moments:
    """Gram of the pruned stream's input, and its cross moment with the dense stream's."""

    def __init__(self, cols: int, device) -> None:
        self.gram = Gram(cols, device)
        self.cross = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.dense_sum = torch.zeros(cols, dtype=torch.float64, device=device)

    def add(self, pruned: Tensor, dense: Optional[Tensor]) -> None:
        self.gram.add(pruned)
        if dense is not None:
            if dense.shape != pruned.shape:
                raise ValueError("the pruned and dense streams disagree on a layer's input shape")
            for p, d in zip(pruned.split(CHUNK_ROWS), dense.split(CHUNK_ROWS)):
                self.cross += (p.float().T @ d.float()).double()
                self.dense_sum += d.float().sum(dim=0).double()


def _collect(
    stage: Stage,
    dense_stage: Optional[nn.Module],
    names: list[str],
    inputs: list[StageInput],
    dense_inputs: Optional[list[StageInput]],
) -> dict[str, _Moments]:
    """Input moments of ``names`` over all batches; each stage run stops after the last of them."""
    moments: dict[str, _Moments] = {}
    dense_layers = dict(dense_stage.named_modules()) if dense_stage is not None else {}
    # A layer's name inside its stage module ("" when the stage is the layer itself).
    rel = {n: "" if n == stage.name else n[len(stage.name) + 1:] for n in names}
    last = names[-1]
    for b, inp in enumerate(inputs):
        mask = inp.attention_mask
        dense_rows: dict[str, Tensor] = {}

        def run(module: nn.Module, layers: dict[str, nn.Module], sink: Callable, args: StageInput):
            def make(name):
                def hook(m, a):
                    sink(name, input_rows(m, a[0].detach(), mask))
                    if name == last:
                        raise _Stop

                return hook

            handles = [m.register_forward_pre_hook(make(n)) for n, m in layers.items()]
            try:
                with eval_mode(module), torch.no_grad():
                    module(*args.args, **args.kwargs)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()

        if dense_stage is not None:
            dl = {n: dense_layers[rel[n]] for n in names}
            run(dense_stage, dl, lambda n, r: dense_rows.__setitem__(n, r), dense_inputs[b])

        def add(name: str, rows: Tensor) -> None:
            if name not in moments:
                moments[name] = _Moments(layer_columns(stage.layers[name]), rows.device)
            moments[name].add(rows, dense_rows.get(name))

        run(stage.module, {n: stage.layers[n] for n in names}, add, inp)
    return moments


def _corrected(problem: LayerProblem, mom: _Moments, damp: float) -> LayerProblem:
    """The same-input problem whose optimum is that of ``min ||W' X̃ - W X||² + λ||W' - W||²``.

    ``||W'X̃ - WX||² = ||(W' - W*) X̃||² + const`` with ``W* = (W Cᵀ + λW)(H̃ + λI)⁻¹`` and
    ``C = X̃ᵀX / n``; the bias rides along as a constant-1 input in both streams.
    """
    n = mom.gram.rows
    w, h = problem.augmented()
    cols = problem.hessian.shape[0]
    c = mom.cross / n
    if problem.has_bias:
        ca = c.new_empty(cols + 1, cols + 1)
        ca[:cols, :cols] = c
        ca[:cols, cols] = mom.gram.xsum / n
        ca[cols, :cols] = mom.dense_sum / n
        ca[cols, cols] = 1.0
        c = ca
    lam = damp * float(torch.diagonal(h)[:cols].mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    rhs = w @ c.T + lam * w
    target = torch.linalg.solve(h + lam * eye, rhs.T).T
    weight, bias = problem.split(target)
    return LayerProblem(weight, problem.hessian, bias, problem.mean)


def _trainable(stage: Stage, frozen: set[int]) -> list[nn.Parameter]:
    return [p for p in stage.module.parameters() if p.requires_grad and id(p) not in frozen]


def walk(
    model: nn.Module,
    dense: Optional[nn.Module],
    stages: list[Stage],
    calib,
    settings: WalkSettings,
    frozen: set[int],
    bar=None,
) -> WalkResult:
    """Reconstruct every stage in order (see the module docstring); returns per-layer results."""
    result = WalkResult()
    dense_named = dict(dense.named_modules()) if dense is not None else {}
    prev: Optional[tuple] = None  # (inputs, outputs, dense inputs, dense outputs)
    for i, stage in enumerate(stages):
        # Outputs are needed only to chain into the next stage (and the dense ones to fit to).
        chain_next = i + 1 < len(stages) and stages[i + 1].chained
        dense_stage = dense_named.get(stage.name)
        if stage.chained and prev is not None:
            inputs = chain(prev[0], prev[1])
            dense_inputs = chain(prev[2], prev[3]) if dense_stage is not None else None
        else:
            inputs = capture_inputs(model, stage.module, calib)
            dense_inputs = capture_inputs(dense, dense_stage, calib) if dense_stage is not None else None
        groups = stage.groups if settings.within_stage == "sequential" else [list(stage.layers)]
        for group in groups:
            moments = _collect(
                stage, dense_stage if settings.correct else None, group, inputs,
                dense_inputs if settings.correct else None,
            )
            check_rows_seen({f"layer {name!r}": moments[name].gram.rows for name in group})
            for name in group:
                layer = stage.layers[name]
                problem = problem_for(layer, moments[name].gram)
                if settings.correct:
                    problem = _corrected(problem, moments[name], settings.damp)
                keep = current_keep(layer) if settings.sparsities is None else None
                sparsity = None if keep is not None else settings.sparsities[name]
                solution = solve(
                    problem, settings.method, sparsity=sparsity, keep=keep,
                    structure=settings.structure, damp=settings.damp,
                )
                install(layer, solution)
                result.layers.append(LayerResult(
                    name, weight_shape(layer),
                    1.0 - float(solution.keep.float().mean()), settings.method,
                    problem.output_error(solution.weight, solution.bias),
                ))
        dense_outputs = (run_stage(dense_stage, dense_inputs)
                         if dense_stage is not None and (settings.blockwise or chain_next) else None)
        stage_result = StageResult(stage.name, len(stage.layers))
        if settings.blockwise:
            module = stage.module

            def forward(i: int, module=module, inputs=inputs) -> Tensor:
                inp = inputs[i]
                return model_output(module(*inp.args, **inp.kwargs))

            with eval_mode(module):
                stage_result.fit = fit(
                    _trainable(stage, frozen), forward, dense_outputs, loss=relative_mse,
                    epochs=settings.epochs, lr=settings.lr, holdout=settings.holdout,
                    patience=settings.patience, seed=settings.seed,
                )
        prev = (inputs, run_stage(stage.module, inputs), dense_inputs, dense_outputs) if chain_next else None
        result.stages.append(stage_result)
        if bar is not None:
            bar.update(1)
    return result
