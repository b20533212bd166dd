"""Stages: the units reconstruction walks through in order, and how to feed each one.

A stage is a block of the model -- a transformer layer, a residual block -- or a lone prunable
layer outside any block. Blocks are found automatically as the children of a ``ModuleList`` /
``Sequential`` that repeats one module class (Hugging Face ``encoder.layer`` / ``h`` /
``layers``, torchvision ``layer1``...), or named by the user.

Stage inputs are recorded from a real forward pass (the positional and keyword arguments the
stage is called with: hidden states, attention masks, ...). Running the whole model again for
every stage would cost a quadratic number of block forwards, so where stage ``k+1`` is called
with exactly stage ``k``'s output (the same tensor object) and the same other arguments --
checked once on a probe batch -- its inputs are built from stage ``k``'s outputs instead
("chained"); elsewhere the model is replayed up to the stage and stopped there.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..calibration.capture import eval_mode, model_device
from ..calibration.data import Batch, iter_batches
from ..calibration.outputs import model_output


@dataclass
class Stage:
    name: str
    module: nn.Module
    layers: dict[str, nn.Module]  # qualified name -> prunable layer, in execution order
    # Layers of the stage grouped by shared input (q, k, v read the same tensor), in order.
    groups: list[list[str]] = field(default_factory=list)
    chained: bool = False  # inputs can be built from the previous stage's outputs


@dataclass
class StageInput:
    """How a stage was called for one calibration batch, plus that batch's token mask."""

    args: tuple
    kwargs: dict
    attention_mask: Optional[Tensor]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted stage has been reached."""


def _primary_slot(args: tuple, kwargs: dict) -> tuple[str, Any]:
    if args:
        return "arg", 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "kw", "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return "kw", key
    raise TypeError("a stage was called without any tensor input")


def primary_input(inp: StageInput) -> Tensor:
    kind, key = _primary_slot(inp.args, inp.kwargs)
    return inp.args[key] if kind == "arg" else inp.kwargs[key]


def with_primary(inp: StageInput, tensor: Tensor) -> StageInput:
    """The same call with its main input replaced (the previous stage's new output)."""
    kind, key = _primary_slot(inp.args, inp.kwargs)
    if kind == "arg":
        return StageInput((tensor,) + tuple(inp.args[1:]), inp.kwargs, inp.attention_mask)
    return StageInput(inp.args, {**inp.kwargs, key: tensor}, inp.attention_mask)


def _contains(module: nn.Module, layers: dict[str, nn.Module]) -> bool:
    ids = {id(m) for m in layers.values()}
    return any(id(m) in ids for m in module.modules())


def _auto_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Names of the children of repeated-block containers, outermost first."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b}.") for b in found):
            continue
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        kids = [(f"{name}.{k}" if name else k, c) for k, c in module.named_children()]
        # Only composite children count as blocks: a Sequential of Linear/ReLU is one network.
        composite = [(n, c) for n, c in kids if len(list(c.children())) > 0 and _contains(c, layers)]
        if not composite:
            continue
        _, common = Counter(type(c) for _, c in composite).most_common(1)[0]
        if common >= 2:
            found.extend(n for n, _ in composite)
    return found


def find_stages(
    model: nn.Module, layers: dict[str, nn.Module], blocks: Optional[Sequence[str]] = None
) -> list[Stage]:
    """Stages covering every layer in ``layers``, in module order (execution order is set by
    :func:`probe`). ``blocks``: module names to use as blocks instead of the automatic ones."""
    named = dict(model.named_modules())
    if blocks is None:
        block_names = _auto_blocks(model, layers)
    else:
        if isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks):
            raise TypeError(f"blocks must be a list of module names, got {blocks!r}")
        missing = [b for b in blocks if b not in named]
        if missing:
            raise ValueError(f"blocks {missing} are not modules of the model")
        block_names = list(blocks)
        for a in block_names:
            for b in block_names:
                if a != b and b.startswith(f"{a}."):
                    raise ValueError(f"blocks {a!r} and {b!r} are nested; name disjoint blocks")
    stages: list[Stage] = []
    covered: set[str] = set()
    for b in block_names:
        inner = {n: m for n, m in layers.items() if n.startswith(f"{b}.") or n == b}
        if inner:
            stages.append(Stage(b, named[b], inner))
            covered.update(inner)
    for n, m in layers.items():
        if n not in covered:
            stages.append(Stage(n, m, {n: m}))
    return stages


def _first_batch(calib: Iterable, model: nn.Module) -> Batch:
    for batch in iter_batches(calib, model_device(model)):
        return batch
    raise ValueError("calib is empty")  # iter_batches already raises; kept for type checkers


def probe(model: nn.Module, stages: list[Stage], calib: Iterable) -> list[Stage]:
    """Run one batch to order stages and their layers by execution, group layers by shared
    input, and decide which stages are chained to the one before. Returns the sorted stages."""
    order: dict[int, int] = {}
    seen_in: dict[int, tuple] = {}
    seen_out: dict[int, Any] = {}
    shares_input: dict[str, bool] = {}  # layer -> reads the very tensor the layer before it read
    last_input: list = [None]  # weak reference to the input of the layer called last
    layer_order: dict[str, int] = {}
    calls: Counter = Counter()
    handles = []
    # Read (and check) the batch before any hook is registered: a bad batch raises here.
    batch = _first_batch(calib, model)

    def stage_pre(idx):
        def hook(module, args, kwargs):
            calls[idx] += 1
            order.setdefault(idx, len(order))
            seen_in.setdefault(idx, (args, kwargs))

        return hook

    def stage_post(idx):
        def hook(module, args, kwargs, output):
            seen_out.setdefault(idx, output)

        return hook

    def layer_pre(name):
        def hook(module, args):
            # Compared at call time through a weak reference: ids of freed tensors get reused.
            x, last = args[0], last_input[0]
            if name not in layer_order:
                layer_order[name] = len(layer_order)
                shares_input[name] = last is not None and last() is x
            last_input[0] = weakref.ref(x) if isinstance(x, Tensor) else None

        return hook

    for i, st in enumerate(stages):
        handles.append(st.module.register_forward_pre_hook(stage_pre(i), with_kwargs=True))
        handles.append(st.module.register_forward_hook(stage_post(i), with_kwargs=True))
        for n, m in st.layers.items():
            handles.append(m.register_forward_pre_hook(layer_pre(n)))
    try:
        with eval_mode(model), torch.no_grad():
            try:
                model(*batch.args, **batch.kwargs)
            except Exception as e:  # a wrong feature size, a missing key...
                raise ValueError(
                    f"calibration batch #0 does not run through the model: {type(e).__name__}: {e}"
                ) from e
    finally:
        for h in handles:
            h.remove()
    never = [st.name for i, st in enumerate(stages) if i not in order]
    if never:
        raise ValueError(f"the calibration forward never reached {never}")
    repeated = [st.name for i, st in enumerate(stages) if calls[i] > 1]
    if repeated:
        raise ValueError(
            f"{repeated} run more than once per forward (shared weights); reconstruction "
            "needs each block to run once: exclude them"
        )
    ranked = sorted(range(len(stages)), key=lambda i: order[i])
    result = []
    for pos, i in enumerate(ranked):
        st = stages[i]
        unreached = [n for n in st.layers if n not in layer_order]
        if unreached:
            raise ValueError(f"the calibration forward never reached layers {unreached}")
        names = sorted(st.layers, key=lambda n: layer_order[n])
        st.layers = {n: st.layers[n] for n in names}
        st.groups = []
        for n in names:
            if st.groups and shares_input[n] and layer_order[n] == layer_order[st.groups[-1][-1]] + 1:
                st.groups[-1].append(n)
            else:
                st.groups.append([n])
        st.chained = pos > 0 and _is_chained(seen_out[ranked[pos - 1]], *seen_in[ranked[pos - 1]],
                                             *seen_in[i])
        result.append(st)
    return result


def _is_chained(prev_out: Any, prev_args: tuple, prev_kwargs: dict, args: tuple, kwargs: dict) -> bool:
    """Stage inputs == (previous stage's output, previous stage's other arguments), by identity."""
    try:
        slot = _primary_slot(args, kwargs)
        if slot != _primary_slot(prev_args, prev_kwargs):
            return False
        if primary_input(StageInput(args, kwargs, None)) is not model_output(prev_out):
            return False
    except TypeError:
        return False
    if len(prev_args) != len(args) or prev_kwargs.keys() != kwargs.keys():
        return False
    skip_arg = 0 if slot[0] == "arg" else None
    skip_kw = slot[1] if slot[0] == "kw" else None
    same_args = all(a is b for i, (a, b) in enumerate(zip(prev_args, args)) if i != skip_arg)
    return same_args and all(prev_kwargs[k] is kwargs[k] for k in kwargs if k != skip_kw)


def capture_inputs(model: nn.Module, stage: nn.Module, calib: Iterable) -> list[StageInput]:
    """Every batch's call of the ``stage`` module in a forward pass of ``model``, stopped there."""
    got: list[StageInput] = []
    current: dict[str, Optional[Tensor]] = {"mask": None}

    def hook(module, args, kwargs):
        got.append(StageInput(_detach(args), _detach(kwargs), current["mask"]))
        raise _Stop

    handle = stage.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in iter_batches(calib, model_device(model)):
                current["mask"] = batch.kwargs.get("attention_mask")
                try:
                    model(*batch.args, **batch.kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def _is_kv_cache(obj: Any) -> bool:
    # Hugging Face decoders pass a key/value cache object that every call appends to; replayed
    # calls would then attend to keys from earlier replays. A stage runs on its own inputs only.
    return type(obj).__name__.endswith("Cache") and callable(getattr(obj, "update", None))


def _detach(obj: Any) -> Any:
    """Recorded stage arguments: tensors detached, key/value caches dropped (None)."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if _is_kv_cache(obj):
        return None
    if isinstance(obj, tuple):
        return tuple(_detach(v) for v in obj)
    if isinstance(obj, list):
        return [_detach(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def run_stage(module: nn.Module, inputs: list[StageInput]) -> list[Tensor]:
    """The stage's main output for every recorded call (eval mode, no grad)."""
    with eval_mode(module), torch.no_grad():
        return [model_output(module(*inp.args, **inp.kwargs)) for inp in inputs]


def chain(inputs: list[StageInput], outputs: list[Tensor]) -> list[StageInput]:
    """Inputs of a chained stage: the previous stage's calls with its outputs as main input."""
    return [with_primary(inp, out) for inp, out in zip(inputs, outputs)]
