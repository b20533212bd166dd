"""Non-uniform per-layer sparsity: how much each layer loses when only the total is fixed.

Both allocators return ``{layer name: sparsity}`` whose parameter-weighted mean (weights of each
layer's ``weight``) is the requested total. ``prune(..., allocation="owl" | "search")`` feeds that
to the planner as layer-scope overrides; reconstruction can take the same dict. Neither
function changes the model.

* :func:`owl_sparsities` (after OWL, Yin et al. 2023): a layer whose Wanda scores hold more
  outliers keeps more weights. One calibration pass, no trial pruning.
* :func:`search_sparsities`: prune each layer alone at a few levels, measure how far the model's
  output moves, and pick the levels with the least summed error that still meet the total.

Each layer's planned count is ``round(sparsity * units)``, so after planning the total is met to
within half a unit per layer, as with uniform layer scope.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration import Batch, capture_input_sq_norms, check_calib, check_rows_seen, eval_mode, iter_batches
from ..calibration.capture import model_device
from ..calibration.outputs import model_output
from .allocation import _fraction
from .criteria import Criterion, ScoreContext, get_criterion, wanda_scores
from .gradients import LossFn
from .layers import check_no_foreign_parametrization, is_prunable
from .masks import effective_weight_and_mask
from .._validate import real
from .._weights import stored_weight, weight_shape
from .planning import _bar_disabled, _Planner, check_shapes
from .structures import Structure, get_structure

SEARCH_OFFSETS = (-0.2, -0.1, 0.0, 0.1, 0.2)  # default levels: sparsity + these
MAX_SEARCH_LEVEL = 0.99


def _check_model_layers(model: object, layers: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty dict of name -> nn.Linear / nn.Conv2d / Conv1D")
    bad = [n for n, m in layers.items() if not is_prunable(m)]
    if bad:
        raise TypeError(f"layers must be nn.Linear / nn.Conv2d / Conv1D modules; not: {bad}")
    for name, module in layers.items():  # layers given by hand skip find_prunable_layers' checks
        check_no_foreign_parametrization(name, module)


def _numel(module: nn.Module) -> int:
    return math.prod(weight_shape(module))


def block_groups(layers: Iterable[str]) -> dict[str, str]:
    """Layer name -> its block: the name up to and including its first numeric component.

    ``"encoder.layer.3.attention.self.query"`` -> ``"encoder.layer.3"``, so every layer of one
    transformer block (or one stage of an ``nn.Sequential``) shares a key; a name with no numeric
    component is its own group. ``layers`` is a dict of layers or an iterable of names.
    """
    groups = {}
    for name in layers:
        parts = name.split(".")
        i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        groups[name] = name if i is None else ".".join(parts[: i + 1])
    return groups


def _group_of(layers: Mapping[str, nn.Module], groups: Optional[Mapping]) -> dict[str, tuple]:
    """Layer name -> internal group key; layers absent from ``groups`` stand alone."""
    if groups is None:
        return {name: ("layer", name) for name in layers}
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a dict of layer name -> group key, got {groups!r}")
    # Tagged keys: a user's group key never collides with a lone layer's name.
    return {n: ("group", groups[n]) if n in groups else ("layer", n) for n in layers}


def shift_to_total(
    base: Sequence[float], sizes: Sequence[int], caps: Sequence[float], sparsity: float
) -> list[float]:
    """``clamp(base[i] + c, 0, caps[i])`` with the one shift ``c`` that makes the
    ``sizes``-weighted mean equal ``sparsity``.

    The weighted mean is continuous, piecewise linear and non-decreasing in ``c`` (its kinks are
    where a layer hits a clamp), so ``c`` is found exactly: bisect the kinks for the segment that
    crosses the target, then solve that segment's line. Raises if the caps cannot reach it.
    """
    want = sparsity * sum(sizes)
    if sum(n * cap for n, cap in zip(sizes, caps)) < want:
        raise ValueError(
            f"sparsity={sparsity:g} would leave some layer with no weights; lower it or exclude "
            "the smallest layers"
        )

    def removed(c: float) -> float:
        return sum(n * min(cap, max(0.0, b + c)) for b, n, cap in zip(base, sizes, caps))

    kinks = sorted({-b for b in base} | {cap - b for b, cap in zip(base, caps)})
    j = bisect.bisect_left(range(len(kinks)), True, key=lambda i: removed(kinks[i]) >= want)
    if j == 0:  # want == 0: everything clamped at 0
        c = kinks[0]
    else:
        lo, hi = kinks[j - 1], kinks[j]
        r_lo, r_hi = removed(lo), removed(hi)
        c = lo + (want - r_lo) * (hi - lo) / (r_hi - r_lo)  # r_lo < want <= r_hi
    return [min(cap, max(0.0, b + c)) for b, cap in zip(base, caps)]


def owl_sparsities(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable,
    sparsity: float,
    *,
    lam: float = 0.08,
    m: float = 5.0,
    groups: Optional[Mapping[str, Any]] = None,
) -> dict[str, float]:
    """Per-layer sparsities by outlier ratio (OWL): outlier-rich layers are pruned less.

    A layer's outlier ratio D is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` above
    ``m`` times their mean (over a group: all its layers' scores together, against the group's
    mean). D maps linearly onto ``[sparsity - lam, sparsity + lam]`` (the highest D gets the
    lowest sparsity), then one common shift makes the parameter-weighted mean exactly
    ``sparsity`` while every layer stays in ``[0, 1 - 1/numel]`` (at least one weight kept).
    Equal ratios (or ``lam=0``) give ``sparsity`` everywhere.

    Args:
        layers: name -> ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (e.g.
            :func:`~sparsenet.pruning.find_prunable_layers`); masked layers score their
            masked weights.
        calib: calibration batches (see :mod:`sparsenet.calibration`), read once.
        lam: half-width of the sparsity range; OWL's paper uses 0.02-0.1.
        m: outlier threshold as a multiple of the mean score; the paper uses 3-10.
        groups: layer name -> group key; a group's layers share one ratio (OWL decides per
            transformer block: pass ``block_groups(layers)``). Absent layers stand alone;
            ``None``: every layer alone.
    """
    _check_model_layers(model, layers)
    total = _fraction(sparsity, "sparsity")
    width = real(lam, "lam")
    if width < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    multiple = real(m, "m")
    if multiple <= 0:
        raise ValueError(f"m must be > 0, got {m!r}")
    key = _group_of(layers, groups)
    check_calib(calib)
    sq = capture_input_sq_norms(model, layers, calib)

    order = list(dict.fromkeys(key.values()))
    sums = dict.fromkeys(order, 0.0)
    counts = dict.fromkeys(order, 0)
    def scores(name: str) -> Tensor:
        module = layers[name]
        return wanda_scores(module, effective_weight_and_mask(module)[0], sq[name])

    for name in layers:
        s = scores(name)
        sums[key[name]] += float(s.double().sum())
        counts[key[name]] += s.numel()
    outliers = dict.fromkeys(order, 0)
    for name in layers:  # recomputed: only one layer's scores live at a time
        g = key[name]
        outliers[g] += int((scores(name) > multiple * sums[g] / counts[g]).sum())
    ratio = [outliers[g] / counts[g] for g in order]

    lo, hi = min(ratio), max(ratio)
    if hi > lo:
        base = [total + width - 2 * width * (d - lo) / (hi - lo) for d in ratio]
    else:
        base = [total] * len(order)
    caps = dict.fromkeys(order, 1.0)
    for name, module in layers.items():
        caps[key[name]] = min(caps[key[name]], 1.0 - 1.0 / _numel(module))
    # Group sizes are the weights of `counts`: one score per weight.
    shares = shift_to_total(base, [counts[g] for g in order], [caps[g] for g in order], total)
    per_group = dict(zip(order, shares))
    return {name: per_group[key[name]] for name in layers}


def _levels(levels: Optional[Sequence[float]], total: float) -> list[float]:
    if levels is None:
        top = max(MAX_SEARCH_LEVEL, total)
        return sorted({min(top, max(0.0, total + d)) for d in SEARCH_OFFSETS})
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable):
        raise TypeError(f"levels must be a sequence of floats in [0, 1), got {levels!r}")
    grid = sorted({_fraction(x, "each of levels") for x in levels})
    if not grid or not grid[0] <= total <= grid[-1]:
        raise ValueError(
            f"levels {grid} must bracket sparsity={total:g} (some level <= it, some >= it)"
        )
    return grid


def _per_sample(output: Any, batch: Batch) -> tuple[Tensor, int]:
    """(samples, features) float32 view of the output, padding positions zeroed, and how many
    samples hold any data (not all padding)."""
    y = model_output(output).detach()
    y = y.reshape(1) if y.dim() == 0 else y
    samples = y.shape[0]
    mask = batch.kwargs.get("attention_mask")
    if mask is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        keep = (mask != 0).to(y.device)
        y = y * keep.view(*mask.shape, *([1] * (y.dim() - 2)))
        samples = int(keep.any(dim=1).sum())
    # Explicit sizes, not -1: a batch of zero samples has no size to infer.
    return y.float().reshape(y.shape[0], math.prod(y.shape[1:])), samples


def _output_error(model: nn.Module, batches: list[Batch], dense: list[Tensor]) -> float:
    """Mean over samples of 1 - cos(output, dense output)."""
    total, n = 0.0, 0
    for batch, ref in zip(batches, dense):
        y, _ = _per_sample(model(*batch.args, **batch.kwargs), batch)
        cos = F.cosine_similarity(y, ref, dim=1)
        total += float((1.0 - cos).sum())
        n += cos.numel()
    return total / n


def _trial_error(
    model: nn.Module, module: nn.Module, keep: Tensor, batches: list[Batch], dense: list[Tensor]
) -> float:
    """Output error with ``module`` masked by ``keep``: its weight's storage is swapped for a
    masked copy and the original storage put back however the forward ends."""
    param = stored_weight(module)
    saved = param.data
    param.data = torch.where(keep, saved, saved.new_zeros(()))
    try:
        return _output_error(model, batches, dense)
    finally:
        param.data = saved


def _lower_hull(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (xs[b] - xs[a]) * (ys[i] - ys[a]) - (ys[b] - ys[a]) * (xs[i] - xs[a])
            if cross > 0:
                break
            hull.pop()  # b lies on or above the chord a-i
        hull.append(i)
    return hull


def choose_levels(
    errors: Mapping[str, Sequence[float]],
    levels: Sequence[float],
    sizes: Mapping[str, int],
    sparsity: float,
) -> dict[str, float]:
    """Minimise ``sum errors[layer](level)`` subject to the ``sizes``-weighted mean = ``sparsity``.

    The linear relaxation of this multiple-choice knapsack is solved exactly by a greedy: every
    layer starts at the lowest level and climbs its lower convex hull of (level, error); all
    climbs are taken in order of error per removed weight until the total is reached. The last
    climb stops part-way, so at most one layer ends between two levels and the weighted mean
    is ``sparsity`` exactly (up to float rounding). Ties: earlier layer first.
    """
    names = list(errors)
    chosen = {name: levels[0] for name in names}
    moves = []
    for i, name in enumerate(names):
        hull = _lower_hull(levels, errors[name])
        for a, b in zip(hull, hull[1:]):
            gain = (levels[b] - levels[a]) * sizes[name]
            moves.append(((errors[name][b] - errors[name][a]) / gain, i, levels[a], levels[b]))
    want = sparsity * sum(sizes[n] for n in names)
    removed = sum(levels[0] * sizes[n] for n in names)
    for _, i, a, b in sorted(moves):
        if removed >= want:
            break
        name = names[i]
        gain = (b - a) * sizes[name]
        if removed + gain >= want:
            chosen[name] = a + (want - removed) / sizes[name]
            break
        chosen[name] = b
        removed += gain
    return chosen


def search_sparsities(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable,
    sparsity: float,
    *,
    levels: Optional[Sequence[float]] = None,
    criterion: str | Criterion = "wanda",
    structure: str | Structure = "unstructured",
    loss_fn: Optional[LossFn] = None,
    max_batches: int = 4,
    progress: Optional[bool] = None,
) -> dict[str, float]:
    """Per-layer sparsities from a one-layer-at-a-time sensitivity search.

    For each layer alone and each level, the layer is masked by ``criterion`` / ``structure``
    at that level (everything else as it is) and the model's output on the first
    ``max_batches`` calibration batches is compared with the unpruned output: the error is
    ``1 - cosine similarity`` per sample (output flattened, padding positions zeroed), averaged.
    Then :func:`choose_levels` picks the levels: least summed error at a parameter-weighted mean
    of exactly ``sparsity`` (one layer may land between two levels). Summing per-layer errors
    ignores how they interact; it is a cheap proxy, not a joint search.

    Cost: ``len(layers) * len(levels) * max_batches`` forward passes, plus the criterion's own
    calibration pass over the same batches; the reference outputs of those batches are held
    (float32) throughout. Default levels: ``sparsity + (-0.2, -0.1, 0, 0.1, 0.2)`` clipped to
    [0, 0.99]. ``loss_fn`` is for ``criterion="taylor"``.

    The model is left exactly as it was (weights, masks, flags), even when a forward raises:
    each trial swaps the layer's weight storage for a masked copy and swaps it back.
    """
    _check_model_layers(model, layers)
    total = _fraction(sparsity, "sparsity")
    grid = _levels(levels, total)
    is_int = isinstance(max_batches, numbers.Integral) and not isinstance(max_batches, bool)
    if not is_int or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    criterion_fn = get_criterion(criterion)
    structure_obj = get_structure(structure)
    if getattr(structure_obj, "fixed_sparsity", None) is not None:
        raise ValueError(
            f"structure {structure_obj.name!r} fixes every layer's sparsity; nothing to search"
        )
    check_shapes(layers, structure_obj)
    check_calib(calib)
    raw = list(itertools.islice(calib, max_batches))
    if not raw:
        raise ValueError("calib is empty: it yielded no batches")

    ctx = ScoreContext(model=model, layers=layers, calib=raw, loss_fn=loss_fn)
    prepare = getattr(criterion_fn, "prepare", None)
    if prepare is not None:
        prepare(ctx)  # before no_grad: gradient criteria need autograd
    planner = _Planner(criterion_fn, structure_obj, ctx)
    errors: dict[str, list[float]] = {}
    bar = tqdm(
        layers.items(), total=len(layers), desc="sensitivity", unit="layer",
        disable=_bar_disabled(progress, len(layers)),
    )
    with bar, eval_mode(model), torch.no_grad():
        batches = list(iter_batches(raw, model_device(model)))
        outputs = [_per_sample(model(*b.args, **b.kwargs), b) for b in batches]
        check_rows_seen({"the model's output": sum(n for _, n in outputs)})
        dense = [y for y, _ in outputs]
        for name, module in bar:
            units = planner.unit_scores(name, module)
            current = effective_weight_and_mask(module)[1]
            row = []
            for level in grid:
                keep = planner.mask(name, units, round(level * units.numel()))
                unchanged = bool(keep.all()) if current is None else torch.equal(keep, current)
                row.append(0.0 if unchanged else _trial_error(model, module, keep, batches, dense))
            errors[name] = row
    sizes = {name: _numel(module) for name, module in layers.items()}
    return choose_levels(errors, grid, sizes, total)


ALLOCATIONS = ("uniform", "owl", "search")


def allocate(
    allocation: str,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable,
    sparsity: float,
    *,
    groups: Optional[Mapping[str, Any]] = None,
    criterion: str | Criterion = "wanda",
    structure: str | Structure = "unstructured",
    loss_fn: Optional[LossFn] = None,
    progress: Optional[bool] = None,
) -> dict[str, float]:
    """Per-layer sparsities averaging ``sparsity``, by one of :data:`ALLOCATIONS`: the same for
    every layer, by outlier ratio (:func:`owl_sparsities`, shared within ``groups``), or by
    measured output error (:func:`search_sparsities`). ``prune`` and ``reconstruct`` both use it."""
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return {name: sparsity for name in layers}
    if allocation == "owl":
        return owl_sparsities(model, layers, calib, sparsity, groups=groups)
    return search_sparsities(model, layers, calib, sparsity, criterion=criterion, structure=structure,
                             loss_fn=loss_fn, progress=progress)
