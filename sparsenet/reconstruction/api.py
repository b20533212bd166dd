"""The front door: ``sparsenet.reconstruct(model, calib, sparsity=...)``."""

from __future__ import annotations

import copy
import io
import numbers
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from rich.console import Console, Group
from rich.table import Table
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .._names import check_exclude
from .._progress import bar_disabled
from .._validate import integer, real
from ..calibration.capture import eval_mode, model_device
from ..calibration.data import check_calib, iter_batches
from ..calibration.outputs import model_output
from ..pruning.layers import is_prunable, select_layers
from ..pruning.masks import find_weight_mask, remove_pruning
from ..pruning.nonuniform import ALLOCATIONS, allocate
from ..pruning.planning import fit_structure
from ..pruning.report import skipped_lines, with_skipped
from ..pruning.structures import get_structure
from .blockwise import LOSSES, FitResult, check_holdout, fit
from .layerwise import METHODS, LayerResult
from .solvers import DEFAULT_DAMP
from .stages import find_stages, probe
from .walk import StageResult, WalkSettings, walk

@dataclass
class ReconstructionResult:
    """What :func:`reconstruct` did: per-layer solves and per-stage fits; ``finalize()`` bakes.

    The model keeps sparsenet's mask parametrizations (like :func:`sparsenet.prune`), so it can
    be fine-tuned with the masks held, passed to :func:`sparsenet.sparsify` as is, or baked
    into plain weights with :meth:`finalize`. ``skipped`` maps each layer left dense (a weight
    tied to an embedding, a structure that does not fit) to the reason; they print as one line
    each.
    """

    model: nn.Module
    layers: list[LayerResult]
    stages: list[StageResult]
    modules: dict[str, nn.Module]
    final: Optional[FitResult] = None  # the end-to-end pass on the model's output, if run
    skipped: dict[str, str] = field(default_factory=dict)
    _masks: dict[str, Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The layers' live mask buffers, held here: finalize() drops the parametrizations that
        # own them, and masks / sparsity must still answer afterwards (as Pruner.masks does).
        self._masks = {n: find_weight_mask(m).mask for n, m in self.modules.items()}

    @property
    def masks(self) -> dict[str, Tensor]:
        """Bool keep-masks (weight-shaped, True = kept) of the reconstructed layers; after
        :meth:`finalize`, the record of what it baked. Do not modify them."""
        return dict(self._masks)

    @property
    def sparsity(self) -> float:
        """Fraction of the reconstructed layers' weights that are zero (masked out)."""
        masks = self.masks.values()
        total = sum(m.numel() for m in masks)
        return 1.0 - sum(int(m.sum()) for m in masks) / max(total, 1)

    def finalize(self) -> nn.Module:
        for module in self.modules.values():
            remove_pruning(module)
        return self.model

    def table(self) -> Table:
        """One row per reconstructed layer: shape, sparsity, solver, relative output error."""
        table = Table(title=f"reconstruction: {len(self.layers)} layers, sparsity {self.sparsity:.1%}")
        for col in ("layer", "shape", "sparsity", "method", "layer error"):
            table.add_column(col, justify="left" if col in ("layer", "method") else "right")
        for r in self.layers:
            table.add_row(r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}", r.method, f"{r.error:.4f}")
        return table

    def fits_table(self) -> Optional[Table]:
        """One row per block fit (and the final pass): held-out loss before and after, epochs."""
        fits = [(s.name, s.fit) for s in self.stages if s.fit is not None]
        if self.final is not None:
            fits.append(("model output", self.final))
        if not fits:
            return None
        table = Table(title="block fits (held-out relative error)")
        for col in ("stage", "before", "after", "epochs", "kept epoch"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for name, f in fits:
            table.add_row(name, f"{f.before:.4g}", f"{f.after:.4g}", str(f.epochs), str(f.best_epoch))
        return table

    def __rich__(self) -> Group:
        fits = self.fits_table()
        return Group(with_skipped(self.table(), self.skipped), *([fits] if fits is not None else []))

    def __str__(self) -> str:
        buf = io.StringIO()
        Console(file=buf, width=120, force_terminal=False).print(self)
        return buf.getvalue()


class _Rollback:
    """Put the model back exactly as it was if reconstruction fails part-way.

    ``dense`` is a deep copy taken before anything changed; it also serves as the dense
    reference, so its masks are opened (all True) and the originals kept here.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        self.model, self.layers = model, layers
        self.masks = {n: (m.mask.clone() if (m := find_weight_mask(l)) is not None else None)
                      for n, l in layers.items()}
        self.dense = copy.deepcopy(model)
        for m in self.dense.modules():
            if (mask := find_weight_mask(m)) is not None:
                mask.mask.fill_(True)

    def restore(self) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                saved = self.masks[name]
                ours = find_weight_mask(layer)
                if saved is None and ours is not None:
                    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
                elif saved is not None:
                    ours.mask.copy_(saved)
            theirs = self.dense.state_dict()
            for key, value in self.model.state_dict(keep_vars=True).items():
                if key.endswith(".mask") and ".parametrizations." in key:
                    continue
                if key in theirs:
                    value.data.copy_(theirs[key])


def reconstruct(
    model: nn.Module,
    calib: Iterable,
    sparsity: Optional[float] = None,
    *,
    structure: str | object = "unstructured",
    block: Optional[tuple[int, int]] = None,
    method: str = "admm",
    blockwise: bool = True,
    correct: bool = True,
    allocation: str = "uniform",
    exclude: Optional[Sequence[str]] = None,
    blocks: Optional[Sequence[str]] = None,
    within_stage: str = "sequential",
    final: Optional[str] = None,
    damp: float = DEFAULT_DAMP,
    epochs: int = 10,
    lr: float = 3e-4,
    holdout: float = 0.2,
    patience: int = 2,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> ReconstructionResult:
    """Prune ``model`` one-shot (or keep its masks) and rebuild its weights from ``calib``.

    Args:
        model: any module whose ``nn.Linear`` / ``nn.Conv2d`` / Hugging Face ``Conv1D`` layers
            are reachable (a Conv1D is solved as the Linear it is); modified in place, and left
            exactly as it was if anything raises. Layers whose weight is tied to another module's
            and layers the structure cannot tile are left dense, listed in ``result.skipped``.
        calib: calibration batches (a list or DataLoader of tensors, ``(inputs, targets)`` pairs
            or dicts of keyword arguments; see :mod:`sparsenet.calibration`). The last
            ``holdout`` fraction of batches is held out for early stopping of block fits.
        sparsity: fraction of each layer's weights to remove, in [0, 1) (the solvers choose the
            masks). ``None``: keep the masks the model already carries (from
            :func:`sparsenet.prune`) and reconstruct the weights under them. N:M structures fix
            their own sparsity.
        structure, block: as in :func:`sparsenet.prune` (``"unstructured"``, ``"2:4"``,
            ``"block"`` with ``block=(r, c)``, ``"channel"``).
        method: layer solver: ``"sparsegpt"`` (OBS, column blocks of 128), ``"admm"``
            (gradual-mask ADMM then exact refit), ``"lsq"`` (Wanda mask, exact refit).
        blockwise: after the layers of a block are solved, fit the block's kept weights to the
            dense block's outputs with Adam (``epochs``, ``lr``, early stopping with
            ``patience`` on the held-out batches).
        correct: solve each layer against the dense layer's output on the *dense* model's
            inputs, so it also absorbs the error of the stages before it.
        allocation: per-layer sparsities: ``"uniform"``, ``"owl"`` (outlier-weighted, per
            block) or ``"search"`` (sensitivity search); same total either way.
        exclude: layer names / globs left dense and untouched.
        blocks: module names to treat as blocks; default: detected (transformer layers,
            residual blocks); layers outside any block are their own stage.
        within_stage: ``"sequential"`` solves a block's layers group by group, each on inputs
            from the block as pruned so far; ``"parallel"`` gathers all statistics of a block
            in one pass (as the SparseGPT paper does; faster).
        final: after all stages, fit every reconstructed stage's kept weights (and the
            blocks' other parameters) end to end so the model's own output matches the dense
            model's: ``"kl"`` (logits), ``"cosine"`` (embeddings) or ``"mse"``; same
            ``epochs`` / ``lr`` / held-out early stopping as the block fits. ``None``: skip.
        damp: Hessian damping, relative to the mean of its diagonal.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_calib(calib)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if final is not None and final not in LOSSES:
        raise ValueError(f"final must be None or one of {', '.join(LOSSES)}, got {final!r}")
    if within_stage not in ("sequential", "parallel"):
        raise ValueError(f"within_stage must be 'sequential' or 'parallel', got {within_stage!r}")
    structure_obj = get_structure(structure, block)
    if structure_obj.name == "channel" and method == "sparsegpt":
        raise ValueError("structure='channel' needs method='lsq' or 'admm': OBS prunes within rows")
    damp = real(damp, "damp", 0.0, low_open=True)
    epochs = integer(epochs, "epochs")
    patience = integer(patience, "patience", 1)
    lr = real(lr, "lr", 0.0, low_open=True)
    holdout = check_holdout(holdout)
    for flag, what in ((blockwise, "blockwise"), (correct, "correct")):
        if not isinstance(flag, bool):
            raise TypeError(f"{what} must be a bool, got {flag!r}")
    layers, skipped = select_layers(model, check_exclude(exclude))
    fixed = getattr(structure_obj, "fixed_sparsity", None)
    if allocation != "uniform" and fixed is not None:
        raise ValueError(f"allocation={allocation!r} cannot vary a fixed-sparsity structure ({structure_obj.name})")
    masked = {n for n, m in layers.items() if find_weight_mask(m) is not None}
    value: Optional[float] = None  # None: reconstruct under the masks the model carries
    if sparsity is None and fixed is None:
        if not masked:
            raise ValueError(
                "pass sparsity= (the solvers choose the masks), or prune the model first with "
                "sparsenet.prune to reconstruct under its masks"
            )
        if allocation != "uniform":
            raise ValueError("allocation only applies when the solvers choose the masks (sparsity=)")
        layers = {n: m for n, m in layers.items() if n in masked}
    else:
        if masked:
            raise ValueError(
                f"layers {sorted(masked)[:5]} are already masked; pass sparsity=None to "
                "reconstruct under those masks, or remove them first"
            )
        value = fixed if fixed is not None else sparsity
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
        if fixed is not None and sparsity is not None and abs(float(sparsity) - fixed) > 1e-9:
            raise ValueError(f"structure {structure_obj.name!r} fixes sparsity at {fixed:g}")
    layers, misfits = fit_structure(layers, structure_obj)
    skipped.update(misfits)
    # The layer-wise solvers see one input matrix per layer; a grouped convolution has one per group.
    grouped = {name: "a grouped convolution, which the layer-wise solvers do not handle"
               for name, layer in layers.items() if isinstance(layer, nn.Conv2d) and layer.groups != 1}
    if grouped and len(grouped) == len(layers):
        raise ValueError("no layer can be reconstructed: " + "; ".join(skipped_lines({**skipped, **grouped})))
    skipped.update(grouped)
    layers = {name: layer for name, layer in layers.items() if name not in grouped}
    # The probe runs one batch: bad calibration data fails here, before anything changes.
    stages = probe(model, find_stages(model, layers, blocks), calib)
    sparsities = None
    if value is not None:
        # OWL shares one level within each stage (a transformer block, or blocks=...).
        groups = {name: stage.name for stage in stages for name in stage.layers}
        sparsities = allocate(allocation, model, layers, calib, float(value), groups=groups,
                              structure=structure_obj)

    rollback = _Rollback(model, layers)
    # Layers not reconstructed (excluded, or unmasked under sparsity=None) stay as they are
    # through block fits too.
    chosen = {id(m) for m in layers.values()}
    frozen = {id(p) for m in model.modules() if is_prunable(m) and id(m) not in chosen
              for p in m.parameters()}
    settings = WalkSettings(
        method=method, structure=structure_obj, sparsities=sparsities, damp=damp,
        within_stage=within_stage, correct=correct, blockwise=blockwise, epochs=epochs, lr=lr,
        holdout=holdout, patience=patience, seed=seed,
    )
    # The walk reads the dense model only to correct inputs or fit blocks to it.
    walk_dense = rollback.dense if (blockwise or correct) else None
    disable = bar_disabled(progress)
    try:
        with tqdm(total=len(stages), desc="reconstruct", unit="stage", disable=disable) as bar:
            result = walk(model, walk_dense, stages, calib, settings, frozen, bar)
        final_fit = None
        if final is not None:
            final_fit = _fit_output(model, rollback.dense, stages, calib, frozen, final, settings)
    except BaseException:
        rollback.restore()
        raise
    return ReconstructionResult(model, result.layers, result.stages, layers, final_fit, skipped)


def _fit_output(model, dense, stages, calib, frozen, loss, settings) -> FitResult:
    """Adam on every stage's trainable parameters against the dense model's outputs."""
    batches = list(iter_batches(calib, model_device(model)))
    with eval_mode(dense), torch.no_grad():
        targets = [model_output(dense(*b.args, **b.kwargs)).detach() for b in batches]
    seen: set[int] = set()
    params = []
    for stage in stages:
        for p in stage.module.parameters():
            if p.requires_grad and id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                params.append(p)

    def forward(i: int) -> Tensor:
        return model_output(model(*batches[i].args, **batches[i].kwargs))

    with eval_mode(model):
        return fit(params, forward, targets, loss=LOSSES[loss], epochs=settings.epochs,
                   lr=settings.lr, holdout=settings.holdout, patience=settings.patience,
                   seed=settings.seed)
