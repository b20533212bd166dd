"""``sparsenet.shrink``: remove whole channels (neurons, filters) and rebuild a smaller dense network.

1. Trace the model on the example inputs and find its channel groups (:mod:`.graph`).
2. Score each group's channels: the pruning package's criterion on every weight a channel owns
   (its producer rows, norm parameters, consumer columns), reduced per channel with the same norm
   ``structure="channel"`` uses.
3. Decide how many channels each group loses: the pruning package's scopes ("global": one ranking
   across groups, by score, until ``ratio`` of the shrinkable parameters is gone; "layer": every
   group loses ``ratio`` of its channels), never a whole group, widths rounded to ``round_to``.
4. Slice every member and update the modules (:mod:`.removal`); check the forward still runs.

Groups the graph cannot prove safe to shrink are left as they are and listed with the reason.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from .._hf_config import ffn_layers, sync_config
from .._names import check_exclude, check_patterns_match, is_excluded
from .._validate import integer, real
from .._weights import stored_weight
from ..calibration import check_calib
from ..pruning.allocation import check_bounds
from ..pruning.scope import get_scope
from .graph import DependencyGraph, Group, build_graph
from .importance import IMPORTANCES, activation_scores, magnitude_scores, obs_scores, reader_dim, taylor_scores
from ..reconstruction.blockwise import LOSSES, FitResult
from .refit import DEFAULT_DAMP, RefitResult, fit_blocks, fit_outputs, refit_consumers
from .removal import positions, remove_channels



@dataclass
class GroupRow:
    """One channel group: the layers that produce it, its width before and after, and why it was
    left alone (empty when it was shrinkable)."""

    producers: list[str]
    width_before: int
    width_after: int
    params_before: int
    params_after: int
    reason: str = ""
    removed: list[int] = field(default_factory=list)  # the group's channel indices taken out


@dataclass
class ShrinkReport:
    rows: list[GroupRow] = field(default_factory=list)
    ratio: float = 0.0
    params_before: int = 0  # the whole model's
    params_after: int = 0
    shrinkable_before: int = 0  # parameters in tensors that shrinkable groups slice
    shrinkable_after: int = 0
    refit: list[RefitResult] = field(default_factory=list)  # the consumers refit on calib
    blocks: list[tuple[str, FitResult]] = field(default_factory=list)  # block fits, if run
    final: Optional[FitResult] = None  # the end-to-end fit to the original's output, if run
    macs_before: int = 0  # multiply-adds of the traced call's Linear / Conv layers
    macs_after: int = 0
    speedup: Optional[float] = None  # target="latency": the last trial's measured speedup
    config: dict[str, tuple[int, int]] = field(default_factory=dict)  # Hugging Face config fields set
    config_notes: list[str] = field(default_factory=list)  # config fields left as they were, and why

    @property
    def shrunk(self) -> list[GroupRow]:
        return [r for r in self.rows if r.width_after < r.width_before]

    @property
    def skipped(self) -> list[GroupRow]:
        return [r for r in self.rows if r.reason]

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"shrink (ratio={self.ratio:g})")
        for col in ("group (producers)", "width", "parameters", "note"):
            table.add_column(col, justify="right" if col in ("width", "parameters") else "left")
        for r in self.rows:
            table.add_row(", ".join(r.producers) or "-", f"{r.width_before} -> {r.width_after}",
                          f"{r.params_before:,} -> {r.params_after:,}", r.reason)
        kept = self.params_after / self.params_before if self.params_before else 1.0
        part = self.shrinkable_after / self.shrinkable_before if self.shrinkable_before else 1.0
        macs = self.macs_after / self.macs_before if self.macs_before else 1.0
        table.caption = (f"{len(self.shrunk)} of {len(self.rows)} groups shrunk; shrinkable parameters "
                         f"{self.shrinkable_before:,} -> {self.shrinkable_after:,} ({part:.1%}); model "
                         f"{self.params_before:,} -> {self.params_after:,} ({kept:.1%}); multiply-adds on the "
                         f"example inputs {self.macs_before:,} -> {self.macs_after:,} ({macs:.1%})")
        console = Console(width=140, record=True, force_terminal=False)
        with console.capture() as cap:
            console.print(table)
            if self.refit:
                before = sum(r.error_before for r in self.refit) / len(self.refit)
                after = sum(r.error_after for r in self.refit) / len(self.refit)
                console.print(f"refit {len(self.refit)} layers that read removed channels: mean relative "
                              f"output error on the calibration data {before:.3g} -> {after:.3g}")
            for name, (before, after) in self.config.items():
                console.print(f"config.{name}: {before} -> {after}")
            for note in self.config_notes:
                console.print(note)
            if self.speedup is not None:
                console.print(f"measured on the example inputs (a trial shrink, before refitting): "
                              f"{self.speedup:.2f}x faster")
            for name, fit_ in self.blocks:
                console.print(f"block {name}: held-out loss {fit_.before:.3g} -> {fit_.after:.3g} "
                              f"({fit_.epochs} epochs)")
            if self.final is not None:
                console.print(f"fit to the original model's output: held-out loss {self.final.before:.3g} -> "
                              f"{self.final.after:.3g} ({self.final.epochs} epochs, kept epoch "
                              f"{self.final.best_epoch})")
        return cap.get()


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor, a tuple of positional arguments, a dict of keyword arguments, or (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return example_inputs[0], example_inputs[1]
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tensor, a tuple of arguments, a dict of keyword arguments "
                    f"or (args, kwargs), got {type(example_inputs).__name__}")


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.state_dict(keep_vars=True))


def _params_per_unit(group: Group, tensors: dict[str, Tensor], cost: Optional[dict[str, int]] = None) -> int:
    """Parameters (not buffers) one channel of ``group`` owns across its members (times ``cost``
    per element of each tensor, when given)."""
    total = 0
    for m in group.members:
        t = tensors[m.name]
        if isinstance(t, nn.Parameter):
            weight = cost[m.name] if cost is not None else 1
            total += t.numel() // t.shape[m.dim] * m.repeat * m.length // group.size * weight
    return total


def _eligible(graph: DependencyGraph, exclude: tuple[str, ...]) -> tuple[list[Group], dict[int, str]]:
    groups, skipped = [], {}
    for g in graph.groups:
        if g.unsafe:
            skipped[g.id] = "; ".join(g.unsafe)
        elif exclude and any(is_excluded(p, exclude) for p in g.producers):
            skipped[g.id] = "excluded"
        elif g.size < 2:
            skipped[g.id] = "a single channel"
        else:
            groups.append(g)
    return groups, skipped


def _round_kept(units: int, remove: int, round_to: int) -> int:
    """Channels to remove so that what is kept is a multiple of ``round_to`` (and at least one)."""
    if round_to <= 1:
        return min(remove, units - 1)
    kept = max(round_to, round((units - remove) / round_to) * round_to)
    return max(0, units - min(kept, units))


TARGETS = ("params", "flops", "latency")


def shrink(model: nn.Module, example_inputs: Any, ratio: float, *, target: str = "params",
           calib: Optional[Iterable] = None,
           reconstruct: bool = True, importance: str = "magnitude", scope: str = "global",
           round_to: int = 1, exclude=None, min_ratio: Optional[float] = None, max_ratio: Optional[float] = None,
           damp: float = DEFAULT_DAMP, blockwise: bool = False,
           final: Optional[str] = None,
           epochs: int = 10, lr: float = 3e-4, loss_fn=None, progress: Optional[bool] = None) -> ShrinkReport:
    """Remove whole channels (Linear neurons, Conv2d filters) from ``model`` in place, so that about
    ``ratio`` of the parameters of its shrinkable layers are gone, and return a report.

    Args:
        model: any module that ``torch.export`` can trace on ``example_inputs``.
        example_inputs: what ``model`` is called with: a tensor, a tuple of arguments, a dict of
            keyword arguments (Hugging Face models: ``use_cache=False``) or ``(args, kwargs)``.
        ratio: fraction of the shrinkable parameters (``target="params"``), of the shrinkable
            layers' multiply-adds on the example inputs (``target="flops"``), or of the measured
            forward time on the example inputs (``target="latency"``: 0.5 asks for 2x faster) to
            remove, in [0, 1).
        target: what ``ratio`` counts: "params", "flops" or "latency". For latency, trial shrinks
            (without refit) at a bisected share of multiply-adds are timed against the model as it
            is, interleaved, until the measured speedup reaches the target; the report keeps the
            last measurement.
        importance: how channels are ranked (:mod:`sparsenet.structure.importance`): "magnitude"
            (the norm of all the weights a channel owns), "activation" (its values on ``calib``
            times the weights that read them), "taylor" (``|w dL/dw|`` over its weights on
            ``calib``, the loss ``loss_fn(output, batch)`` or cross-entropy against the batches'
            targets) or "obs" (the output error of removing it after the optimal refit of its
            readers, greedy, on ``calib``). All but "magnitude" need ``calib``.
        scope: "global" (one ranking across all groups) or "layer" (each group loses ``ratio`` of
            its channels).
        round_to: keep every width a multiple of this (e.g. 8), and at least this.
        min_ratio, max_ratio: ``scope="global"`` only: every group loses at least ``min_ratio`` and at
            most ``max_ratio`` of its channels (before rounding to ``round_to``), the rest following
            the global ranking, as ``prune``'s ``min_sparsity`` / ``max_sparsity``; infeasible bounds
            raise ValueError.
        exclude: module names or globs whose channels are left alone (as for ``prune``).
        calib: calibration batches (the protocol of ``sparsenet.reconstruct``: tensors,
            ``(inputs, targets)`` pairs or dicts of keyword arguments). With ``reconstruct=True``
            every layer that read removed channels is refit by least squares to what the original
            layer computed on this data (:mod:`sparsenet.structure.refit`), its bias absorbing the
            removed channels' mean contribution.
        reconstruct: refit the consumers when ``calib`` is given.
        damp: ridge damping of the refits, relative to the mean input energy.
        blockwise: after the refits, fit each block that holds shrunk or refit layers (a
            transformer layer, a residual block) to the original block's output on ``calib``, one
            block after another, on the shrunk model's own inputs, with held-out early stopping
            (``epochs``, ``lr``). Default off.
        final: after the refits (and block fits), fit the parameters of every shrunk or refit layer end to end to
            the original model's output on ``calib`` ("mse", "cosine" or "kl", as in
            ``sparsenet.reconstruct``), with the last fifth of the batches held out for early
            stopping; ``epochs`` and ``lr`` set that fit. Default off.
        loss_fn: the loss of ``importance="taylor"`` (as for ``sparsenet.prune``'s Taylor criterion).
        progress: a progress bar over the refits (None: only when stderr is a terminal).

    Channel groups that must shrink together (a residual stream, a concat's inputs, a layer and its
    norm) shrink together; a group the graph cannot prove safe (channels reaching the model's
    output, an op it does not follow) is left as it is and named in the report with the reason.
    A group never loses all its channels. On any error the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}")
    if importance != "magnitude" and calib is None:
        raise ValueError(f"importance={importance!r} ranks channels on calibration data: pass calib")
    scope_obj = get_scope(scope)
    round_to = integer(round_to, "round_to", 1)
    bounds = None
    if min_ratio is not None or max_ratio is not None:
        if scope_obj.name != "global":
            raise ValueError("min_ratio / max_ratio need scope='global' (scope='layer' removes ratio of every group)")
        bounds = check_bounds(min_ratio, max_ratio)
    exclude = check_exclude(exclude)
    check_patterns_match(model, exclude)
    args, kwargs = _split_inputs(example_inputs)
    if not isinstance(reconstruct, bool):
        raise TypeError(f"reconstruct must be a bool, got {reconstruct!r}")
    damp = real(damp, "damp", 0.0, low_open=True)
    refitting = reconstruct and calib is not None
    if not isinstance(blockwise, bool):
        raise TypeError(f"blockwise must be a bool, got {blockwise!r}")
    if blockwise and not refitting:
        raise ValueError("blockwise fits the shrunk blocks to the original on calibration data: pass calib "
                         "(and keep reconstruct=True)")
    if final is not None:
        if final not in LOSSES:
            raise ValueError(f"final must be None or one of {', '.join(LOSSES)}, got {final!r}")
        if not refitting:
            raise ValueError("final fits the shrunk model to the original on calibration data: pass calib "
                             "(and keep reconstruct=True)")
    epochs = integer(epochs, "epochs")
    lr = real(lr, "lr", 0.0, low_open=True)
    if calib is not None:
        check_calib(calib)

    # Traced with autograd on: fused inference paths (torch's TransformerEncoderLayer in eval
    # mode) step aside for the plain ops the graph can follow.
    graph = build_graph(model, args, kwargs)
    tensors = _tensors(model)
    groups, skipped = _eligible(graph, exclude)
    if not groups:
        reasons = "; ".join(sorted(set(skipped.values())))[:400]
        raise ValueError(f"nothing in the model can be shrunk: {reasons or 'it has no channel groups'}")

    if importance == "taylor":
        scores = taylor_scores(model, groups, calib, loss_fn)
    elif importance == "activation":
        with torch.no_grad():
            scores = activation_scores(model, groups, calib)
    else:
        scores = magnitude_scores(groups, tensors)
        if importance == "obs":
            with torch.no_grad():
                scores = obs_scores(model, groups, calib, damp, fallback=scores)
    if scope_obj.name == "global" and importance != "obs":
        # Ranked across groups relative to each group's mean: raw weight scales differ between
        # layers (initialisation, width) far more than the importance of their channels does.
        # (OBS scores are relative output errors already: comparable as they are.)
        scores = [s / s.mean().clamp_min(torch.finfo(s.dtype).tiny) for s in scores]

    # What removing a tensor's elements saves: one each (parameters), or the multiply-adds each
    # element does on the example inputs (FLOPs: a weight's output positions; other tensors none).
    flops = {name: graph.positions.get(name, 0) for name in tensors}

    def plan(r: float, cost: dict[str, int]) -> tuple[list[int], dict[int, Tensor]]:
        """Channels each group loses for ``r`` of ``cost``, and which (its lowest-scored)."""
        counts = _allocate(groups, scores, tensors, cost, r, scope_obj, round_to, bounds)
        return counts, {g.id: torch.sort(torch.topk(s, c, largest=False).indices).values for g, s, c
                        in zip(groups, scores, counts)}

    measured: Optional[float] = None
    if target == "latency":  # found as the share of multiply-adds that reaches it, measured
        ratio, measured = _flops_for_latency(model, graph, args, kwargs, float(ratio), lambda r: plan(r, flops)[1])
    counts, removed = plan(float(ratio), {name: 1 for name in tensors} if target == "params" else flops)
    drops = positions(graph, removed)  # (tensor, dim) -> positions removed there
    sizes = [_params_per_unit(g, tensors) for g in groups]

    shrinkable = _member_tensors(groups, tensors)
    report = ShrinkReport(ratio=float(ratio), params_before=_count(model),
                          shrinkable_before=sum(tensors[n].numel() for n in shrinkable))

    original = copy.deepcopy(model) if refitting and any(counts) else None

    def check() -> None:
        # Runs with the channels removed; raising here restores the model (remove_channels).
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (whatever the model raises, the cause is the same)
            raise RuntimeError(
                f"the model no longer runs with its channels removed ({type(e).__name__}: {e}); it was "
                "restored. A module keeps a size of its own that sparsenet does not update: exclude "
                "its layers, or report the model"
            ) from e
        if original is not None:
            consumers = _consumers(drops, original)
            report.refit = refit_consumers(model, original, consumers, calib, damp, progress)
            touched = sorted({name.rpartition(".")[0] for name, _ in drops} | set(consumers))
            if blockwise:
                report.blocks = fit_blocks(model, original, touched, calib, epochs, lr)
            if final is not None:
                report.final = fit_outputs(model, original, _parameters_of(model, touched), calib, final, epochs, lr)

    ffn = ffn_layers(model)
    new_shapes = remove_channels(model, graph, removed, check) if any(counts) else {}
    report.config, report.config_notes = sync_config(model, ffn)
    for g, size, count in zip(groups, sizes, counts):
        report.rows.append(GroupRow(g.producers, g.size, g.size - count, size * g.size, size * (g.size - count),
                                    removed=removed[g.id].tolist()))
    for gid, reason in skipped.items():
        g = graph.group(gid)
        size = _params_per_unit(g, tensors)
        report.rows.append(GroupRow(g.producers, g.size, g.size, size * g.size, size * g.size, reason))
    report.params_after = _count(model)
    numel = lambda n: math.prod(new_shapes[n]) if n in new_shapes else tensors[n].numel()  # noqa: E731
    report.shrinkable_after = sum(numel(n) for n in shrinkable)
    if measured is not None:
        report.speedup = measured
    report.macs_before = sum(tensors[n].numel() * p for n, p in graph.positions.items())
    report.macs_after = sum(numel(n) * p for n, p in graph.positions.items())
    return report


def _allocate(groups: list[Group], scores: list[Tensor], tensors: dict[str, Tensor], cost: dict[str, int],
              ratio: float, scope, round_to: int, bounds: Optional[tuple[float, float]] = None) -> list[int]:
    """Channels each group loses so that ``ratio`` of the shrinkable cost (``cost[name]`` per element
    of tensor ``name``: 1 for parameters, output positions for FLOPs) is removed.

    A tensor that two groups slice (a convolution's filters and its input channels) shrinks in
    both dimensions, so the scope's per-channel accounting overshoots; the ratio handed to the
    scope is searched (bisection) until the parameters actually left match the target.
    """
    shrinkable = _member_tensors(groups, tensors)
    total = sum(tensors[n].numel() * cost[n] for n in shrinkable)
    sizes = [max(1, _params_per_unit(g, tensors, cost)) for g in groups]
    floor, cap = bounds or (0.0, 1.0)
    limits = [(min(floor, (g.size - 1) / g.size), min(cap, (g.size - 1) / g.size)) for g in groups]  # never a whole group

    floor_units = [math.floor(lo * g.size) for g, (lo, _) in zip(groups, limits)]
    # Below this scope ratio the floors alone decide (the scope would refuse it as infeasible).
    floor_share = sum(f * w for f, w in zip(floor_units, sizes)) / sum(g.size * w for g, w in zip(groups, sizes))

    def counts_for(r: float) -> Optional[list[int]]:
        """Per-group removals at scope ratio ``r``; None where the caps make ``r`` infeasible."""
        if scope.name == "global":
            try:
                raw = scope.allocate(scores, max(r, floor_share), sizes, limits=limits,
                                     names=[", ".join(g.producers) for g in groups])
            except ValueError:
                return None
        else:
            raw = scope.allocate(scores, r, sizes)
        return [_round_kept(g.size, c, round_to) for g, c in zip(groups, raw)]

    def removed_fraction(counts: list[int]) -> float:
        left = _params_left(groups, counts, shrinkable, tensors, cost)
        return 1.0 - left / total if total else 0.0

    if ratio == 0.0:
        return [0] * len(groups)
    lo, hi = 0.0, ratio
    best = counts_for(ratio)
    if bounds is not None:
        most = [_round_kept(g.size, math.floor(top * g.size), round_to) for g, (_, top) in zip(groups, limits)]
        if removed_fraction(most) < ratio - 0.01:
            raise ValueError(f"max_ratio={bounds[1]:g} keeps too many channels: at most "
                             f"{removed_fraction(most):.1%} can go, ratio={ratio:g} asks for more")
        best = best or most
        floors = counts_for(0.0)
        if floors is not None and removed_fraction(floors) > ratio + 0.01:
            raise ValueError(f"min_ratio={bounds[0]:g} alone removes {removed_fraction(floors):.1%}, more than "
                             f"ratio={ratio:g}")
    best = best or [_round_kept(g.size, g.size - 1, round_to) for g in groups]
    below = None  # the last counts that removed less than ratio
    for _ in range(30):  # the removed fraction grows with r; find the r that lands on ratio
        mid = (lo + hi) / 2
        counts = counts_for(mid)
        if counts is not None and removed_fraction(counts) < ratio:
            lo, below = mid, counts
        else:
            hi = mid
            best = counts if counts is not None else best
    if below is None or round_to <= 1 or scope.name != "global":
        return best
    # Rounded widths make the removed fraction jump by whole groups' steps between ``below`` and
    # ``best``: step from below in units of ``round_to`` and keep whichever lands nearer.
    caps = [round(top * g.size) for g, (_, top) in zip(groups, limits)]
    stepped = _step_towards(groups, scores, below, ratio, round_to, removed_fraction, caps)
    return min((stepped, best), key=lambda c: abs(removed_fraction(c) - ratio))


def _step_towards(groups: list[Group], scores: list[Tensor], below: list[int], ratio: float, round_to: int,
                  removed_fraction, caps: list[int]) -> list[int]:
    """From removals ``below`` the target, take ``round_to`` more channels at a time from the group
    whose next ones score lowest, among the steps that stay below it; then the smallest step past
    it if that lands nearer."""
    ranked = [torch.sort(s).values for s in scores]
    counts, removed = list(below), removed_fraction(below)
    while True:
        options = []  # (reaches the target, mean score of the channels taken, removed fraction, counts)
        for i, (g, c) in enumerate(zip(groups, counts)):
            if g.size - c - round_to >= round_to and c + round_to <= caps[i]:
                trial = counts.copy()
                trial[i] += round_to
                got = removed_fraction(trial)
                options.append((got >= ratio, float(ranked[i][c:c + round_to].mean()), got, trial))
        under = [o for o in options if not o[0]]
        if under:  # the least important step that does not reach the target yet
            _, _, removed, counts = min(under, key=lambda o: o[1])
            continue
        if not options:
            return counts
        _, _, got, trial = min(options, key=lambda o: o[2])  # the smallest step past it
        return trial if got - ratio < ratio - removed else counts


def _parameters_of(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """The trainable parameters of the modules ``names`` (each once; what the output fit trains)."""
    modules = dict(model.named_modules())
    seen, params = set(), []
    for name in names:
        module = modules.get(name)
        for p in (module.parameters(recurse=False) if module is not None else ()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _member_tensors(groups: list[Group], tensors: dict[str, Tensor]) -> list[str]:
    return list(dict.fromkeys(m.name for g in groups for m in g.members if isinstance(tensors[m.name], nn.Parameter)))


def _params_left(groups: list[Group], counts: list[int], names: list[str], tensors: dict[str, Tensor],
                 cost: Optional[dict[str, int]] = None) -> int:
    """Elements (times ``cost`` each) of tensors ``names`` once each group has lost ``counts``
    channels."""
    lost: dict[tuple[str, int], float] = {}  # fraction of a dim's positions removed
    for g, c in zip(groups, counts):
        for m in g.members:
            if m.name in tensors and c:
                size = tensors[m.name].shape[m.dim]
                lost[(m.name, m.dim)] = lost.get((m.name, m.dim), 0.0) + c / g.size * m.length * m.repeat / size
    left = 0
    for name in names:
        t = tensors[name]
        kept = 1.0
        for d in range(t.dim()):
            kept *= 1.0 - min(1.0, lost.get((name, d), 0.0))
        left += round(t.numel() * kept * (cost[name] if cost is not None else 1))
    return left


def _speedup(dense: nn.Module, small: nn.Module, args: tuple, kwargs: dict, rounds: int = 7) -> float:
    """Median forward time of ``dense`` over that of ``small``, the two interleaved call by call."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for m in (dense, small):
            m(*args, **kwargs)
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                (dense, small)[i](*args, **kwargs)
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / max(statistics.median(times[1]), 1e-12)


def _flops_for_latency(model: nn.Module, graph: DependencyGraph, args: tuple, kwargs: dict, ratio: float,
                       removal) -> tuple[float, Optional[float]]:
    """The share of multiply-adds to remove for ``ratio`` of the forward time: bisection over trial
    removals (``removal(flops ratio)`` -> group indices; no refit, removal alone decides the shapes)
    on copies of ``model``, each timed against it. Returns (flops ratio, last measured speedup)."""
    if ratio == 0.0:
        return 0.0, 1.0
    want = 1.0 / (1.0 - ratio)
    lo, hi, best, measured = 0.0, 0.95, 0.95, None
    for _ in range(6):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)  # same tensor names: the graph's members apply to it as they are
        remove_channels(trial, graph, removal(mid), lambda: None)
        got = _speedup(model, trial, args, kwargs)
        if got >= want:
            hi, best, measured = mid, mid, got
        else:
            lo = mid
    return best, measured


def _consumers(drops: dict[tuple[str, int], Tensor], original: nn.Module) -> dict[str, Tensor]:
    """Layers whose inputs lost channels (Linear, Conv1D, ungrouped Conv2d) -> the rows of the
    original layer's output they keep (all, unless the layer's own outputs shrank too); ``drops``:
    the positions removed per (tensor, dim)."""
    modules = dict(original.named_modules())
    found: dict[str, Tensor] = {}
    for (name, dim), _ in drops.items():
        layer_name, _, attr = name.rpartition(".")
        layer = modules.get(layer_name)
        # (a depthwise filter is its channel's member, not a reader: reader_dim is None for it)
        in_dim = reader_dim(layer) if attr == "weight" and layer is not None else None
        if in_dim is None or dim != in_dim:
            continue
        out_dim = 1 - in_dim
        rows = stored_weight(layer).shape[out_dim]
        keep = torch.ones(rows, dtype=torch.bool)
        gone = drops.get((name, out_dim))
        if gone is not None:
            keep[gone] = False
        found[layer_name] = keep.nonzero().reshape(-1)
    return found


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["shrink", "ShrinkReport", "GroupRow", "IMPORTANCES", "TARGETS"]
