"""The front door: ``prune(model, ...)`` validates, plans all masks, then applies them at once."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .._names import check_exclude
from .._validate import integer
from .criteria import Criterion, ScoreContext, get_criterion
from .flops import output_positions
from .gradients import LossFn
from .allocation import Bounds, Overrides, _is_skip, _raw_settings, check_bounds, resolve_limits
from .layers import select_layers
from .masks import effective_weight_and_mask, find_weight_mask, remove_pruning, set_weight_mask
from .nonuniform import ALLOCATIONS, allocate
from .planning import fit_structure, plan_masks
from .report import PruningReport
from .schedules import PruningStep, Schedule
from .scope import Scope, get_scope
from .structures import Structure, get_structure


PRUNER_STATE_VERSION = 1


@dataclass
class _Recipe:
    """Everything needed to plan masks again at another sparsity (gradual pruning)."""

    model: nn.Module
    layers: dict[str, nn.Module]
    criterion: Criterion
    structure: Structure
    scope: Scope
    seed: Optional[int]
    calib: Optional[Iterable]
    loss_fn: Optional[LossFn]
    progress: Optional[bool]
    limits: Optional[dict[str, Bounds]] = None  # per-layer (floor, cap) at the final sparsity
    final: float = 0.0

    def plan(self, sparsity: float) -> dict[str, Tensor]:
        # A fresh generator per plan: with a seed, "random" scores are the same at every step,
        # so masks of a gradual run nest instead of reshuffling.
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        ctx = ScoreContext(
            generator=generator,
            model=self.model,
            layers=self.layers,
            calib=self.calib,
            loss_fn=self.loss_fn,
        )
        limits = self.limits
        if limits is not None and self.final > 0 and sparsity != self.final:
            # Before a schedule's end, floors (and layer-scope sparsities) scale with the total,
            # so they stay feasible and hold exactly at the final step; caps hold throughout.
            f = sparsity / self.final
            limits = {n: (lo * f, hi) for n, (lo, hi) in limits.items()}
        return plan_masks(
            self.layers, sparsity, self.criterion, self.structure, self.scope, ctx,
            self.progress, limits,
        )


def _describe(obj: object) -> str:
    """A stable name for settings comparison (no memory addresses)."""
    if isinstance(obj, str):
        return obj
    if hasattr(obj, "__qualname__"):  # functions and classes: their repr holds an address
        return obj.__qualname__
    if type(obj).__repr__ is not object.__repr__:
        return repr(obj)
    return type(obj).__qualname__


def _describe_overrides(overrides: object) -> Optional[object]:
    if overrides is None or not isinstance(overrides, dict):
        return None if overrides is None else _describe(overrides)
    return {_describe(k): v for k, v in overrides.items()}


class Pruner:
    """Handle on one pruning of a model: its masks, a report, ``step`` and ``finalize``.

    ``masks`` are the live buffers of the layers' parametrizations (bool, weight-shaped, True =
    kept); do not modify them. After ``finalize`` they remain as a record of what was removed.
    ``skipped`` maps each layer left dense for a reason of its own (a weight tied to an
    embedding, a shape the structure cannot tile) to that reason; the report prints them.

    Pruned weights read exactly zero through any optimizer step: the parametrization computes
    ``layer.weight`` from the mask on every read, and ``finalize`` bakes that read. The stored
    originals under a False mask may still move (momentum, Adam's running averages); nothing
    reads them (masks only ever shrink), so no optimizer hook is installed -- a global
    ``register_optimizer_step_post_hook`` would run after every optimizer in the process,
    including ones that never touch this model.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        masks: dict[str, Tensor],
        *,
        sparsity: float,
        criterion: str | Criterion,
        structure: str | Structure,
        scope: str,
        seed: Optional[int],
        schedule: Optional[Schedule] = None,
        recipe: Optional[_Recipe] = None,
        allocation: Optional[dict] = None,
        skipped: Optional[dict[str, str]] = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self._masks = masks
        self.skipped: dict[str, str] = dict(skipped or {})
        # Settings are kept so pruner.step() can re-run the same recipe.
        self.sparsity, self.criterion, self.structure = sparsity, criterion, structure
        self.scope, self.seed = scope, seed
        self.schedule, self._recipe = schedule, recipe
        # allocation / overrides / min / max, for settings comparison
        self._allocation = allocation or {}
        self.step_count = 0
        self.finalized = False

    @property
    def masks(self) -> dict[str, Tensor]:
        return dict(self._masks)

    @property
    def target(self) -> float:
        """The sparsity in force now: the schedule's at ``step_count``, else ``sparsity``."""
        if self.schedule is None:
            return self.sparsity
        return self.schedule.sparsity_at(self.step_count, self.sparsity)

    def report(self, example=None) -> PruningReport:
        """Per-layer and total sparsity, parameters and FLOPs. FLOPs are per output position unless
        ``example`` (one batch in the calibration protocol) is given: then per sample."""
        report = PruningReport.from_masks(self._masks, self.layers, skipped=self.skipped)
        if example is None:
            return report
        return report.with_positions(output_positions(self.model, self.layers, example))

    def step(self) -> PruningStep:
        """Advance the schedule by one step (call once per optimizer step, after it).

        At an update step the masks are re-planned at the schedule's sparsity with the same
        criterion, structure and scope; already-pruned weights stay pruned. Nothing changes
        (and the step counter does not move) if planning raises.
        """
        if self.finalized:
            raise RuntimeError("step() after finalize(): the masks are already baked in")
        if self.schedule is None:
            raise RuntimeError("step() needs a schedule: prune(..., schedule=CubicSchedule(...))")
        t = self.step_count + 1
        result = self._update(t) if self.schedule.is_update(t) else None
        self.step_count = t
        if result is None:
            result = PruningStep(t, self.target, False, t >= self.schedule.end)
        return result

    def _update(self, t: int) -> PruningStep:
        schedule, target = self.schedule, self.schedule.sparsity_at(t, self.sparsity)
        planned = self._recipe.plan(target)
        if schedule.soft and t < schedule.end:
            shrunk = _shrink(self.layers, planned, schedule.shrink)
            return PruningStep(t, target, True, False, shrunk=shrunk)
        before = {name: mask.clone() for name, mask in self._masks.items()}
        self._masks = _apply(self.layers, planned)
        newly = {n: int((before[n] & ~m).sum()) for n, m in self._masks.items()}
        return PruningStep(t, target, True, t >= schedule.end, newly_pruned=newly)

    def _settings(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "criterion": _describe(self.criterion),
            "structure": _describe(self.structure),
            "scope": self.scope,
            "seed": self.seed,
            "layers": list(self.layers),
            "schedule": None if self.schedule is None else self.schedule.config(),
            # Absent keys read as None, so states saved before these options still load.
            **{k: v for k, v in self._allocation.items() if v is not None},
        }

    def state_dict(self) -> dict:
        """Where a run stands: format version, step, settings and kept counts per layer.

        The masks themselves are not here: they are buffers of the model's parametrizations,
        so they (and the soft schedule's shrunk weights) travel in ``model.state_dict()``.
        The counts let :meth:`load_state_dict` check that the model's state was loaded too.
        """
        return {
            "format_version": PRUNER_STATE_VERSION,
            "step": self.step_count,
            "finalized": self.finalized,
            "settings": self._settings(),
            "kept": {name: int(mask.sum()) for name, mask in self._masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume a run: build the pruner with the same ``prune(...)`` call, load the model's
        ``state_dict`` (masks and weights), then this.

        Everything is checked before anything changes: the format version (a newer one is
        refused), every field ``state_dict()`` writes and its type (TypeError / ValueError
        otherwise), the settings (must equal this pruner's), and the kept counts per layer -- a
        cheap guard against forgetting the model's state, not a proof that it was loaded.
        """
        _check_state_layout(state)
        if self.finalized or state["finalized"]:
            raise RuntimeError("cannot resume a finalized pruning run")
        ours, theirs = self._settings(), state["settings"]
        # key=str: a hand-made state may mix key types, which plain sorting cannot order.
        diff = sorted((k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)), key=str)
        if diff:
            raise ValueError(
                f"Pruner state was saved with other settings ({', '.join(map(str, diff))}); "
                "build the pruner with the same prune(...) arguments"
            )
        kept = {name: int(mask.sum()) for name, mask in self._masks.items()}
        if kept != state["kept"]:
            raise ValueError(
                "the model's masks differ from the saved run's; load the model's state_dict "
                "(which holds the masks) before the pruner's"
            )
        self.step_count = integer(state["step"], "step in Pruner state")

    def finalize(self) -> nn.Module:
        """Write the zeros into plain ``weight`` Parameters and remove the parametrizations.

        Do it after training: from here on nothing keeps the zeros, so an optimizer with
        momentum would move them again.
        """
        for module in self.layers.values():
            remove_pruning(module)
        self.finalized = True
        return self.model

    def __repr__(self) -> str:
        state = "finalized" if self.finalized else "masked"
        sched = ""
        if self.schedule is not None:
            sched = f", schedule={self.schedule!r}, step={self.step_count}"
        return (
            f"Pruner({len(self.layers)} layers, sparsity={self.sparsity}, "
            f"criterion={self.criterion!r}, scope={self.scope!r}{sched}, {state})"
        )


# What Pruner.state_dict() writes (format 1): field -> type.
_STATE_FIELDS = {"format_version": int, "step": int, "finalized": bool, "settings": dict, "kept": dict}


def _check_state_layout(state: object) -> None:
    """The version first (a newer layout is refused as such), then every field with its type."""
    if not isinstance(state, Mapping):
        raise TypeError(f"a Pruner state must be the dict Pruner.state_dict() returns, got {type(state).__name__}")
    if "format_version" not in state:
        raise ValueError("not a Pruner state_dict (no format_version)")
    version = state["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"bad Pruner state format version {version!r}")
    if version > PRUNER_STATE_VERSION:
        raise ValueError(
            f"Pruner state format version {version} is newer than this sparsenet reads "
            f"({PRUNER_STATE_VERSION}); upgrade sparsenet"
        )
    missing = [k for k in _STATE_FIELDS if k not in state]
    if missing:
        raise ValueError(f"Pruner state lacks {missing}; pass what Pruner.state_dict() returned")
    wrong = [
        f"{k} is {type(state[k]).__name__}, not {kind.__name__}" for k, kind in _STATE_FIELDS.items()
        if not isinstance(state[k], kind) or (kind is int and isinstance(state[k], bool))
    ]
    if wrong:
        raise TypeError(f"malformed Pruner state: {'; '.join(wrong)}")


def _shrink(
    layers: dict[str, nn.Module], planned: dict[str, Tensor], factor: float
) -> dict[str, int]:
    """Soft pruning: scale the stored weights the plan would prune by ``factor``, in place."""
    counts = {}
    with torch.no_grad():
        for name, module in layers.items():
            pruned = ~planned[name]
            original = module.parametrizations["weight"].original
            original.mul_(1.0 - (1.0 - factor) * pruned.to(original.dtype))
            counts[name] = int(pruned.sum())
    return counts


def _check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
    return value


def _resolve_sparsity(sparsity: object, structure: Structure) -> float:
    """The requested sparsity, or the one an N:M structure fixes (a different request raises)."""
    fixed = getattr(structure, "fixed_sparsity", None)
    if fixed is None:
        if sparsity is None:
            raise ValueError(f"sparsity is required for structure {structure.name!r}")
        return _check_sparsity(sparsity)
    if sparsity is not None and abs(_check_sparsity(sparsity) - fixed) > 1e-9:
        raise ValueError(
            f"structure {structure.name!r} fixes sparsity at {fixed:g}; sparsity={sparsity!r} "
            "conflicts with it (leave sparsity out)"
        )
    return fixed


def _check_seed(seed: object) -> Optional[int]:
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return seed
    raise TypeError(f"seed must be an int or None, got {seed!r}")


def _check_allocation(
    allocation: object, scope: str, fixed: bool, calib: object, overrides: object,
    layers: dict[str, nn.Module],
) -> None:
    """Non-uniform allocation decides every layer's sparsity itself: layer scope, a free
    sparsity, data to measure with, and no per-layer floats competing with it."""
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return
    what = f"allocation={allocation!r}"
    if scope != "layer":
        raise ValueError(f"{what} sets per-layer sparsities, so it needs scope='layer'")
    if fixed:
        raise ValueError(f"{what} needs a structure without a fixed sparsity (not N:M)")
    if calib is None:
        raise ValueError(f"{what} needs calibration data: pass calib=[batches]")
    pinned = [n for n, v in _raw_settings(layers, overrides).items() if not _is_skip(v)]
    if pinned:
        raise ValueError(
            f"{what} decides every layer's sparsity, but overrides set {pinned}; overrides may "
            "only skip layers (None or 0) here -- or pass owl_sparsities(...) as overrides"
        )




def _drop_skipped(overrides: Optional[Overrides], skipped: dict[str, str]) -> Optional[Overrides]:
    """``overrides`` without the layers left dense; naming one with a sparsity is an error.

    A layer left dense is no prunable layer, so its exact name would otherwise be refused as a
    key that matches nothing; skipping it (None / 0) is what happens anyway.
    """
    if not isinstance(overrides, dict):
        return overrides
    named = {k: v for k, v in overrides.items() if isinstance(k, str) and k in skipped}
    asked = [k for k, v in named.items() if not _is_skip(v)]
    if asked:
        name = asked[0]
        raise ValueError(
            f"overrides[{name!r}]={overrides[name]!r} asks to prune {name!r}, which cannot be: "
            f"{skipped[name]}"
        )
    return {k: v for k, v in overrides.items() if k not in named}


def _apply(layers: dict[str, nn.Module], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Install masks; on any failure undo the ones already installed, so no layer is half-done."""
    undo = []
    try:
        for name, module in layers.items():
            existing = find_weight_mask(module)
            previous = existing.mask.clone() if existing is not None else None
            set_weight_mask(module, masks[name])
            undo.append((module, previous))
    except BaseException:
        for module, previous in reversed(undo):
            if previous is None:
                torch.nn.utils.parametrize.remove_parametrizations(
                    module, "weight", leave_parametrized=False
                )
            else:
                find_weight_mask(module).mask.copy_(previous)
        raise
    return {name: find_weight_mask(module).mask for name, module in layers.items()}


def prune(
    model: nn.Module,
    sparsity: Optional[float] = None,
    criterion: str | Criterion = "magnitude",
    scope: str = "layer",
    exclude: Optional[Sequence[str]] = None,
    seed: Optional[int] = None,
    *,
    structure: str | Structure = "unstructured",
    block: Optional[tuple[int, int]] = None,
    calib: Optional[Iterable] = None,
    loss_fn: Optional[LossFn] = None,
    progress: Optional[bool] = None,
    schedule: Optional[Schedule] = None,
    overrides: Optional[Overrides] = None,
    min_sparsity: Optional[float] = None,
    max_sparsity: Optional[float] = None,
    allocation: str = "uniform",
) -> Pruner:
    """Mask the weights of every ``nn.Linear`` / ``nn.Conv2d`` / Hugging Face ``Conv1D`` in
    ``model`` (in place).

    A Conv1D (GPT-2's layers: a Linear stored transposed) is pruned as the Linear it is: N:M
    groups and blocks run along its inputs, channels are its outputs (columns of its weight);
    its mask is in its own layout. Layers that cannot be pruned as asked are left dense and
    listed, with the reason, in ``pruner.skipped`` and the report: a weight tied to another
    module's (a head tied to the embedding), or a shape the structure cannot tile (a 147-wide
    stem under 2:4); only a structure that fits no layer at all raises.

    Args:
        model: the model; modified in place only after every check and mask has succeeded.
        sparsity: fraction of weights to remove, in [0, 1). ``scope="layer"`` removes exactly
            ``round(sparsity * numel)`` from each layer (to within one unit for structures);
            ``scope="global"`` removes ``round(sparsity * total)`` across the selected layers,
            ranking raw scores together. Leave it out for N:M, which fixes its own.
        criterion: a registered name (``"magnitude"``: |w|; ``"random"``; ``"wanda"``:
            |w| times the input's L2 norm per input feature; ``"taylor"``: |w * dL/dw| summed
            over calibration batches; ``"activation"``: mean |output| of each output channel /
            neuron over ``calib``, for ``structure="channel"``) or a callable ``(Layer, ScoreContext) -> scores``,
            optionally with ``.prepare(ctx)``. Lowest scores go first; ties go to the earlier
            layer, then the lower flat index, so masks are deterministic.
        scope: ``"layer"`` or ``"global"``.
        exclude: qualified module names or fnmatch globs (``["classifier", "*.out_proj"]``);
            excluding a module excludes everything under it. A pattern matching nothing raises.
            Layers inside ``nn.MultiheadAttention`` are always skipped.
        seed: seeds the ``"random"`` criterion; ``None`` uses torch's global RNG.
        structure: ``"unstructured"``; ``"N:M"`` such as ``"2:4"`` (N of every M consecutive
            weights along a row kept); ``"block"`` (r x c tiles kept or removed whole);
            ``"channel"`` (whole output rows / filters); or a structure object such as
            ``Channel(norm="l2")`` or ``Block(4, 4)``. See :mod:`sparsenet.pruning.structures`.
        block: ``(r, c)`` for ``structure="block"``; default 16x16.
        calib: calibration batches for ``"wanda"``, ``"taylor"`` and ``"activation"``: a re-iterable of tensors,
            ``(inputs, targets)`` pairs or dicts of keyword arguments
            (see :mod:`sparsenet.calibration`).
        loss_fn: ``loss_fn(output, batch) -> scalar`` for ``"taylor"``; default cross-entropy
            against the batch's targets.
        progress: show a tqdm bar over layers; ``None`` shows it for more than a few layers.
        schedule: prune gradually: a :class:`~sparsenet.pruning.CubicSchedule`,
            ``LinearSchedule`` or ``CustomSchedule``. The masks start at the schedule's sparsity
            at step 0 and ``pruner.step()`` raises it towards ``sparsity`` (see
            :mod:`sparsenet.pruning.schedules` for how steps count and ``soft``). The pruner
            keeps ``calib`` for the re-scoring. Not with N:M, whose sparsity is fixed.
            Before the end, per-layer sparsities and floors scale with the schedule's total.
        overrides: per-layer settings: a dict keyed by layer name, fnmatch glob or module
            type, or a callable ``(name, module) -> setting or None``. A setting is a float
            (layer scope: the layer's sparsity; global: pins the layer at it), a
            ``(floor, cap)`` pair (global scope), or ``None`` / ``0`` (skip, like ``exclude``).
            Precedence: exclude > exact name > glob > type. A key matching no layer raises, as
            does a sparsity for a layer left dense (tied, or a structure misfit).
            With N:M only skipping is allowed. See :mod:`sparsenet.pruning.allocation`.
        min_sparsity, max_sparsity: ``scope="global"`` only: every layer loses at least
            ``round(min_sparsity * units)`` and at most ``round(max_sparsity * units)`` units
            (weights; blocks or channels for those structures) while the total is still met
            exactly; infeasible bounds raise ValueError. The rest follows the global ranking.
        allocation: how ``scope="layer"`` spreads ``sparsity`` over the layers. ``"uniform"``:
            every layer at ``sparsity``. ``"owl"``: outlier-rich layers pruned less
            (:func:`~sparsenet.pruning.owl_sparsities`, per layer, default ``lam`` / ``m``);
            ``"search"``: each layer's sensitivity measured on ``calib`` with this criterion
            and structure (:func:`~sparsenet.pruning.search_sparsities`). Both keep the
            parameter-weighted mean at ``sparsity`` (to within rounding per layer) and need
            ``calib``; not with N:M, and ``overrides`` may then only skip layers. For other
            settings (OWL per block, other levels) pass their result as ``overrides``.

    Already-pruned layers (sparsenet's masks) are re-scored on their masked weights and the new
    mask is a subset of the old one, so ``sparsity`` is the layer's total, not an increment;
    a layer that is already sparser keeps its mask. Layers pruned with torch.nn.utils.prune
    raise: call :func:`import_torch_pruning` (continue from their masks) or
    :func:`remove_pruning` (bake them) first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    structure_obj = get_structure(structure, block)
    value = _resolve_sparsity(sparsity, structure_obj)
    criterion_fn = get_criterion(criterion)
    scope_obj = get_scope(scope)
    patterns = check_exclude(exclude)
    seed = _check_seed(seed)
    layers, skipped = select_layers(model, patterns)
    layers, misfits = fit_structure(layers, structure_obj)
    skipped.update(misfits)
    layer_overrides = _drop_skipped(overrides, skipped)
    fixed = getattr(structure_obj, "fixed_sparsity", None) is not None
    bounded = min_sparsity is not None or max_sparsity is not None
    if bounded and (scope_obj.name != "global" or fixed):
        raise ValueError("min_sparsity / max_sparsity need scope='global' and a structure "
                         "without a fixed sparsity (not N:M)")
    _check_allocation(allocation, scope_obj.name, fixed, calib, layer_overrides, layers)
    limits = None
    if bounded or layer_overrides is not None:
        default = check_bounds(min_sparsity, max_sparsity)
        limits = resolve_limits(layers, layer_overrides, scope_obj.name, value, default, fixed)
        layers = {name: module for name, module in layers.items() if name in limits}
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a sparsenet.pruning Schedule, got {schedule!r}")
        if getattr(structure_obj, "fixed_sparsity", None) is not None:
            raise ValueError(
                f"structure {structure_obj.name!r} fixes its sparsity; a schedule cannot raise it"
            )
        schedule.check_final(value)
    if allocation != "uniform":
        per_layer = allocate(allocation, model, layers, calib, value, criterion=criterion_fn,
                             structure=structure_obj, loss_fn=loss_fn, progress=progress)
        limits = {name: (s, s) for name, s in per_layer.items()}  # layer scope: exactly that

    recipe = _Recipe(
        model, layers, criterion_fn, structure_obj, scope_obj, seed, calib, loss_fn, progress,
        limits, value,
    )
    start = value if schedule is None else schedule.sparsity_at(0, value)
    planned = recipe.plan(start)
    if schedule is not None and schedule.soft:
        # Soft: nothing is masked before the schedule's end; the plan's weights shrink instead.
        # A layer pruned before keeps its mask (pruned weights are never regrown).
        current = {n: effective_weight_and_mask(m)[1] for n, m in layers.items()}
        keep = {
            n: torch.ones_like(planned[n]) if c is None else c.clone() for n, c in current.items()
        }
        live = _apply(layers, keep)
        _shrink(layers, planned, schedule.shrink)
    else:
        live = _apply(layers, planned)
    return Pruner(
        model, layers, live,
        sparsity=value, criterion=criterion, structure=structure, scope=scope, seed=seed,
        schedule=schedule, recipe=recipe, skipped=skipped,
        allocation={
            "allocation": None if allocation == "uniform" else allocation,
            "overrides": _describe_overrides(overrides),
            "min_sparsity": min_sparsity,
            "max_sparsity": max_sparsity,
        },
    )
