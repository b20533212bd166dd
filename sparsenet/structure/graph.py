"""The dependency graph: which parameters must shrink together when channels are removed.

Built from a traced forward pass (``torch.export`` on the user's example inputs), never from module
names. Every tensor dimension that carries channels is followed through the graph:

* a **group** is one space of channels, created where a layer produces them (a Linear's outputs, a
  Conv2d's filters, an embedding's dimensions);
* a **slot** is one dimension of one traced tensor, described by **segments**: which range of the
  slot holds which range of which group, each group index spread over ``repeat`` consecutive
  positions (a flatten of ``(C, H, W)`` into a Linear's inputs repeats each channel ``H * W`` times);
* a **member** is one dimension of one parameter or buffer that must be sliced with a group: the
  producer's rows and bias, a norm's affine parameters and statistics, a depthwise convolution's
  filters, the consumer's input columns.

Operations move, join and split segments: elementwise ops keep them, ``cat`` concatenates them with
offsets, ``split``/``slice`` cut them, ``flatten`` repeats them, ``permute`` moves them, and a residual
``add`` of two groups merges them into one (all members of a residual stream shrink together).
Anything the graph cannot follow -- an op it does not know, channels split into attention heads,
channels that reach the model's output, a parameter used in a way it did not model -- marks the
groups involved **unsafe** with the reason; such groups are reported and never shrunk.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..nn.attention import supports_head_removal

# ---- segments ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, start + length * repeat)`` of a slot hold group indices
    ``[first, first + length)``, each repeated ``repeat`` times in a row."""

    start: int
    length: int
    group: int
    first: int
    repeat: int = 1

    @property
    def end(self) -> int:
        return self.start + self.length * self.repeat


Segments = tuple[Segment, ...]  # ordered by start; positions not covered are untracked


def _shift(segs: Segments, offset: int) -> Segments:
    return tuple(Segment(s.start + offset, s.length, s.group, s.first, s.repeat) for s in segs)


def _cut(segs: Segments, lo: int, hi: int) -> Optional[Segments]:
    """The segments of positions ``[lo, hi)``, rebased to 0; None when a repeated segment is cut
    inside one group index (no whole channels to follow)."""
    out = []
    for s in segs:
        a, b = max(s.start, lo), min(s.end, hi)
        if a >= b:
            continue
        if (a - s.start) % s.repeat or (b - s.start) % s.repeat:
            return None
        skip = (a - s.start) // s.repeat
        out.append(Segment(a - lo, (b - a) // s.repeat, s.group, s.first + skip, s.repeat))
    return tuple(out)


def _scale(segs: Segments, factor: int) -> Segments:
    """Each position becomes ``factor`` consecutive positions (a flatten with the dims after it)."""
    return tuple(Segment(s.start * factor, s.length, s.group, s.first, s.repeat * factor) for s in segs)


_RETRY = object()  # a view's placement changed the groups: place again


def _tiles(segs: Segments, period: int, total: int) -> Optional[list[Segments]]:
    """``segs`` cut into consecutive tiles of ``period`` positions, each rebased to 0."""
    tiles = [_cut(segs, a, a + period) for a in range(0, total, period)]
    return None if any(t is None for t in tiles) else tiles


def _flattened(segs: Segments, size: int, before: int, after: int) -> Optional[Segments]:
    """Segments of a dim of ``size`` once merged with ``before`` positions of dims ahead of it (the
    layout repeats per index there) and ``after`` positions behind (each channel spans them); None
    where the repeats would be too many to follow (a batch merged into the channels)."""
    if before > 4096:
        return None
    scaled = _scale(segs, after)
    return tuple(s for k in range(before) for s in _shift(scaled, k * size * after))


def _blocks(x_shape, shape) -> Optional[list[tuple[tuple[int, int], tuple[int, int]]]]:
    """The smallest runs of dims of ``x_shape`` and ``shape`` with equal element counts, in order:
    ((input dims), (output dims)) ranges; a reshape only moves elements within such a run."""
    blocks, i, j = [], 0, 0
    while i < len(x_shape) or j < len(shape):
        i0, j0, a, b = i, j, 1, 1
        if i < len(x_shape):
            a, i = x_shape[i], i + 1
        if j < len(shape):
            b, j = shape[j], j + 1
        while a != b:
            if a < b and i < len(x_shape):
                a, i = a * x_shape[i], i + 1
            elif b < a and j < len(shape):
                b, j = b * shape[j], j + 1
            else:
                return None
        blocks.append(((i0, i), (j0, j)))
    return blocks


def _squeezed(shape, dims) -> set[int]:
    """The dims a squeeze removes: those named (all when None) that have size 1."""
    if shape is None:
        return set()
    named = (range(len(shape)) if dims is None
             else [d % len(shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])])
    return {d for d in named if shape[d] == 1}


# ---- groups and members -------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """Dimension ``dim`` of parameter/buffer ``name``: group index ``i`` owns positions
    ``[offset + i * repeat, offset + (i + 1) * repeat)`` there (before ``first`` is subtracted)."""

    name: str
    dim: int
    offset: int
    first: int
    length: int
    repeat: int = 1


@dataclass
class Group:
    id: int
    size: int
    producers: list[str] = field(default_factory=list)  # modules that create the channels
    members: list[Member] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)  # why it cannot be shrunk; empty: it can


class DependencyGraph:
    """Groups of a traced model (``groups``: merged, by representative id) and, per weight that a
    layer multiplies, the output positions it is applied at in the traced call (``positions``: a
    Linear's tokens, a convolution's output pixels, batch included), from which multiply-adds are
    its element count times that."""

    def __init__(self) -> None:
        self._groups: list[Group] = []
        self._parent: list[int] = []
        self.positions: dict[str, int] = {}

    # union-find over group ids: a residual add (or a shared parameter) merges two groups
    def find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def new_group(self, size: int, producer: Optional[str]) -> int:
        gid = len(self._groups)
        self._groups.append(Group(gid, size, [producer] if producer else []))
        self._parent.append(gid)
        return gid

    def group(self, g: int) -> Group:
        return self._groups[self.find(g)]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ga, gb = self._groups[ra], self._groups[rb]
        self._parent[rb] = ra
        ga.producers += gb.producers
        ga.members += gb.members
        ga.unsafe += gb.unsafe

    def add_member(self, seg: Segment, name: str, dim: int) -> None:
        self.group(seg.group).members.append(Member(name, dim, seg.start, seg.first, seg.length, seg.repeat))

    def mark_unsafe(self, segs: Segments, reason: str) -> None:
        for s in segs:
            g = self.group(s.group)
            if reason not in g.unsafe:
                g.unsafe.append(reason)

    @property
    def groups(self) -> list[Group]:
        return [g for g in self._groups if self.find(g.id) == g.id]


# ---- tracing --------------------------------------------------------------------------------------


def trace(model: nn.Module, args: tuple, kwargs: dict):
    """The model's forward as an ``ExportedProgram`` (ATen ops, shapes on every node)."""
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 (export raises many kinds; the user needs the cause)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"could not trace the model on the example inputs ({type(e).__name__}: {first}); pass "
            "example_inputs the model runs on (for Hugging Face models: keyword arguments and "
            "use_cache=False)"
        ) from e


def _shape(node) -> Optional[tuple[int, ...]]:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _module_of(node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export names modules like "L['self'].encoder.layer[0]" in some versions; keep dotted paths
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "").replace("'", "")


_KEEP_SHAPE = {  # outputs with the input's channel layout, element by element
    "relu", "relu_", "gelu", "silu", "silu_", "tanh", "sigmoid", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "softplus", "mish", "dropout", "clone", "contiguous", "alias",
    "detach", "_to_copy", "to", "type_as", "neg", "abs", "exp", "erf", "sqrt", "rsqrt", "relu6",
    "lift_fresh_copy", "feature_dropout", "native_dropout",
}
_BINARY = {"add", "sub", "mul", "div", "maximum", "minimum", "rsub", "add_", "mul_", "sub_", "div_", "pow"}
_POOL = {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d_with_indices",
         "upsample_nearest2d", "upsample_bilinear2d"}
_CHECKS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
           "_assert_async"}


def _opname(target) -> str:
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))  # aten ops: "relu.default"
    return name.split(".")[0]


class _Propagator:
    def __init__(self, program, model: nn.Module) -> None:
        self.program = program
        self.graph = DependencyGraph()
        sig = program.graph_signature
        self.param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # placeholder -> name
        self.slots: dict[Any, list[Segments]] = {}  # node -> per-dim segments (or tuple outputs)
        self.modelled_uses: dict[str, set] = {}  # param name -> nodes that use it in a modelled way
        self._rescaled: dict[Segment, Segment] = {}  # a segment before a coarsening -> after it
        self.derived: dict[Any, tuple[str, tuple[Optional[int], ...]]] = {}  # node -> (param, dims)
        self.model = model

    # -- helpers
    def segs(self, node, ndim: Optional[int] = None) -> list[Segments]:
        if not isinstance(node, torch.fx.Node):
            return [()] * (ndim or 0)
        got = self.slots.get(node)
        if got is None:
            shape = _shape(node)
            return [()] * (len(shape) if shape else 0)
        return got

    def tracked(self, node) -> list[Segments]:
        return [s for s in self.segs(node) if s]

    def param(self, node) -> Optional[str]:
        return self.param_of.get(node.name) if isinstance(node, torch.fx.Node) else None

    def origin(self, node, dim: int) -> Optional[tuple[str, int]]:
        """(parameter, its dim) that ``node``'s dim ``dim`` comes from, for a tensor that is a
        parameter reshaped without mixing (unsqueeze, expand, a copy): a class token, a position
        embedding, a learned scale."""
        got = self.derived.get(node) if isinstance(node, torch.fx.Node) else None
        if got is None or not 0 <= dim < len(got[1]) or got[1][dim] is None:
            return None
        return got[0], got[1][dim]

    def _derive(self, node, op: str, shape) -> None:
        """Follow a parameter through ops that only add, broadcast or copy dims."""
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        got = self.derived.get(src) if src is not None else None
        if got is None or shape is None:
            return
        name, dims = got
        if op == "unsqueeze":
            at = node.args[1] % len(shape)
            dims = dims[:at] + (None,) + dims[at:]
        elif op == "expand":
            src_shape = _shape(src) or ()
            lead = len(shape) - len(dims)
            dims = (None,) * lead + tuple(
                d if src_shape[i] == shape[lead + i] else None for i, d in enumerate(dims))
        elif op not in _KEEP_SHAPE or shape != _shape(src):
            return
        self.derived[node] = (name, dims)
        self.modelled_uses.setdefault(name, set()).add(node)

    def use(self, param_node, user) -> Optional[str]:
        name = self.param(param_node)
        if name is not None:
            self.modelled_uses.setdefault(name, set()).add(user)
        return name

    def unsafe_inputs(self, node, reason: str) -> None:
        for arg in node.all_input_nodes:
            for segs in self.segs(arg):
                if segs:
                    self.graph.mark_unsafe(segs, reason)

    # -- the walk
    def run(self) -> DependencyGraph:
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in self.param_of:
                self.derived[node] = (self.param_of[node.name], tuple(range(len(_shape(node) or ()))))
            elif node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    for segs in self.segs(arg):
                        self.graph.mark_unsafe(segs, "its channels reach the model's output")
        self.check_parameter_uses()
        return self.graph

    def visit(self, node) -> None:
        op = _opname(node.target)
        if op in _CHECKS:  # assertions export inserts: they compute nothing
            return
        shape = _shape(node)
        handler = getattr(self, f"op_{op}", None)
        if handler is not None:
            result = handler(node, shape)
        elif op in _KEEP_SHAPE:
            result = list(self.segs(node.args[0])) if shape == _shape(node.args[0]) else None
        elif op in _BINARY:
            result = self.binary(node, shape)
        elif op in _POOL:
            src = self.segs(node.args[0])
            result = [()] * len(shape) if shape else None
            if result is not None and len(src) == len(shape):
                result[1] = src[1]  # pooling keeps the channel dimension (N, C, H, W)
                if any(src[d] for d in range(2, len(src))):
                    result = None
        else:
            result = None
        if op in ("unsqueeze", "expand") or op in _KEEP_SHAPE:
            self._derive(node, op, shape)
        if result is None:
            if any(self.tracked(a) for a in node.all_input_nodes):
                self.unsafe_inputs(node, f"its channels flow through {op}, which the graph cannot follow")
            self.slots[node] = [()] * (len(shape) if shape else 0)
        else:
            self.slots[node] = result

    # elementwise with broadcasting: dims aligned from the right; equal tracked dims are merged
    def binary(self, node, shape):
        if shape is None:
            return None
        out: list[Segments] = [()] * len(shape)
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        for k in range(1, len(shape) + 1):
            d_out = len(shape) - k
            tracked, plain, params = [], 0, []
            for arg in operands:
                arg_shape = _shape(arg) or ()
                d_in = len(arg_shape) - k
                if d_in < 0 or arg_shape[d_in] != shape[d_out] or shape[d_out] == 1:
                    continue  # broadcast along this dim: it does not meet the channels
                origin = self.origin(arg, d_in)
                segs = self.segs(arg)
                if origin is not None:
                    params.append(origin)
                    self.modelled_uses.setdefault(origin[0], set()).add(node)
                elif d_in < len(segs) and segs[d_in]:
                    tracked.append(segs[d_in])
                else:
                    plain += 1
            if not tracked:
                continue
            joined = tracked[0]
            for other in tracked[1:]:
                joined = self.join(joined, other)
            if plain:  # shrinking the channels would leave the other operand wider
                self.graph.mark_unsafe(joined, f"{_opname(node.target)} combines its channels with a tensor "
                                               "the graph does not track")
            for name, d_in in params:  # a learned scale or offset along the channels: a member
                for seg in joined:
                    self.graph.add_member(seg, name, d_in)
            out[d_out] = joined
        for arg in operands:
            self.use(arg, node)
        return [self.segs_now(o) for o in out]

    def join(self, a: Segments, b: Segments) -> Segments:
        """Two operands' segments on one dimension: equal layouts merge their groups (a residual
        add); layouts that differ only in how many positions each index spans (heads shared by
        several query heads under GQA) are first coarsened to agree."""
        if not a or not b:
            return a or b
        if len(a) == len(b) == 1 and a[0].repeat != b[0].repeat:
            fine, coarse = (a, b) if a[0].repeat < b[0].repeat else (b, a)
            if coarse[0].repeat % fine[0].repeat == 0:
                self.coarsen(fine[0].group, coarse[0].repeat // fine[0].repeat)
                a, b = self.segs_now(a), self.segs_now(b)
        if [(s.start, s.length, s.repeat) for s in a] != [(s.start, s.length, s.repeat) for s in b]:
            self.graph.mark_unsafe(a + b, "a residual connection joins differently laid-out channels")
            return a
        if len(a) == 1 and a[0].group == b[0].group and a[0].first != b[0].first:
            # Two equal ranges of one group meet (the query and key parts of a fused QKV
            # projection): index i of one is index i of the other, so the group folds onto them.
            if self.fold(a[0].group, a[0].length, a[0].first, b[0].first):
                a, b = self.segs_now(a), self.segs_now(b)
        for sa, sb in zip(a, b):
            ga, gb = self.graph.group(sa.group), self.graph.group(sb.group)
            if sa.first != 0 or sb.first != 0 or sa.length != ga.size or sb.length != gb.size:
                self.graph.mark_unsafe(a + b, "a residual connection joins parts of channel groups")
                return a
            self.graph.union(sa.group, sb.group)
        return a

    def segs_now(self, segs: Segments) -> Segments:
        """``segs`` as they are after any coarsening or folding since they were read."""
        out: list[Segment] = []
        pending = list(segs)
        while pending:
            s = pending.pop(0)
            if s in self._rescaled:
                got = self._rescaled[s]
                pending[:0] = list(got) if isinstance(got, tuple) else [got]
            else:
                out.append(s)
        return tuple(out)

    def fold(self, gid: int, period: int, *firsts: int) -> bool:
        """Identify index ``i`` of group ``gid`` with ``i + period``, ``i + 2 period``, ...: the group
        shrinks to ``period`` indices, each member or segment spanning several periods splits into
        one piece per period. Only where every range starts on a period boundary and ``firsts``
        (the ranges that met) are distinct periods; False (nothing changed) otherwise."""
        root = self.graph.find(gid)
        group = self.graph.group(root)
        if period <= 0 or group.size % period or any(f % period for f in firsts):
            return False
        found = [(dims, d, s) for dims in self._all_dims() for d, ss in enumerate(dims) for s in ss
                 if self.graph.find(s.group) == root]
        # Every range must start a period and lie within one, or cover whole periods.
        ranges = [(m.first, m.length) for m in group.members] + [(s.first, s.length) for _, _, s in found]
        if any(first % period or (length > period and length % period) for first, length in ranges):
            return False

        def pieces(first: int, length: int, start: int, repeat: int):
            for a in range(first, first + length, period):
                b = min(a + period, first + length)
                yield start + (a - first) * repeat, a % period, b - a

        group.members = [Member(m.name, m.dim, offset, f, n, m.repeat)
                         for m in group.members for offset, f, n in pieces(m.first, m.length, m.offset, m.repeat)]
        group.size = period
        for dims, d, s in found:
            split = tuple(Segment(start, n, s.group, f, s.repeat) for start, f, n in pieces(s.first, s.length, s.start, s.repeat))
            if split == (s,):
                continue
            dims[d] = tuple(x for old in dims[d] for x in (split if old == s else (old,)))
            self._rescaled[s] = split if len(split) > 1 else split[0]
        return True

    def coarsen(self, gid: int, factor: int) -> bool:
        """Make each index of group ``gid`` stand for ``factor`` consecutive ones (channels become
        heads), everywhere the group appears; False (nothing changed) where that would split one."""
        root = self.graph.find(gid)
        group = self.graph.group(root)
        if factor == 1:
            return True
        found = [(dims, d, s) for dims in self._all_dims() for d, ss in enumerate(dims) for s in ss
                 if self.graph.find(s.group) == root]
        if group.size % factor or any(m.first % factor or m.length % factor for m in group.members) or any(
                s.first % factor or s.length % factor for _, _, s in found):
            return False
        group.size //= factor
        group.members = [Member(m.name, m.dim, m.offset, m.first // factor, m.length // factor, m.repeat * factor)
                         for m in group.members]
        for dims, d, s in found:
            new = Segment(s.start, s.length // factor, s.group, s.first // factor, s.repeat * factor)
            dims[d] = tuple(new if x == s else x for x in dims[d])
            if new != s:
                self._rescaled[s] = new
        return True

    def _all_dims(self):
        """Every per-dimension segment list recorded so far (a split's pieces included)."""
        for dims in self.slots.values():
            if dims and isinstance(dims[0], list):
                yield from dims
            elif dims:
                yield dims

    # -- layers
    def _count(self, weight: str, out_shape, out_channels: int) -> None:
        """Output positions of a layer's call (a weight used twice counts both calls)."""
        self.graph.positions[weight] = self.graph.positions.get(weight, 0) + math.prod(out_shape) // max(out_channels, 1)

    def op_linear(self, node, shape):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        wname, bname = self.use(w, node), self.use(b, node)
        xs = self.segs(x)
        if wname is None or shape is None:
            return None
        for seg in xs[-1]:
            self.graph.add_member(seg, wname, 1)  # the consumer's input columns
        self._count(wname, shape, shape[-1])
        out = list(xs[:-1]) + [()]
        gid = self.graph.new_group(shape[-1], _module_of(node))
        seg = Segment(0, shape[-1], gid, 0)
        self.graph.add_member(seg, wname, 0)
        if bname is not None:
            self.graph.add_member(seg, bname, 0)
        out[-1] = (seg,)
        return out

    def op_addmm(self, node, shape):
        """``bias + x @ w`` on 2-D operands: how transformers' Conv1D (GPT-2) computes, its weight
        stored (in, out)."""
        b, x, w = node.args[:3]
        wname, bname = self.use(w, node), self.use(b, node)
        xs = self.segs(x)
        if wname is None or shape is None or xs[0]:
            return None
        for seg in xs[1]:
            self.graph.add_member(seg, wname, 0)
        self._count(wname, shape, shape[1])
        gid = self.graph.new_group(shape[1], _module_of(node))
        seg = Segment(0, shape[1], gid, 0)
        self.graph.add_member(seg, wname, 1)
        if bname is not None:
            self.graph.add_member(seg, bname, 0)
        return [(), (seg,)]

    def op_conv2d(self, node, shape):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        groups = node.args[6] if len(node.args) > 6 else 1
        wname, bname = self.use(w, node), self.use(b, node)
        xs = self.segs(x)
        if wname is None or shape is None or any(xs[d] for d in (0, 2, 3)):
            return None
        out_channels, in_channels = shape[1], (_shape(x) or (0, 0))[1]
        self._count(wname, shape, out_channels)
        out: list[Segments] = [(), (), (), ()]
        if groups == 1:
            for seg in xs[1]:
                self.graph.add_member(seg, wname, 1)
            gid = self.graph.new_group(out_channels, _module_of(node))
            out[1] = (Segment(0, out_channels, gid, 0),)
        elif groups == in_channels == out_channels:
            # Depthwise: channel c is filtered by filter c alone, so input and output channels are
            # one group and the filters are its members.
            if not xs[1]:
                gid = self.graph.new_group(out_channels, _module_of(node))
                out[1] = (Segment(0, out_channels, gid, 0),)
            else:
                out[1] = xs[1]
        else:
            if xs[1]:
                self.graph.mark_unsafe(xs[1], "a grouped convolution (groups between 1 and its channels)")
            gid = self.graph.new_group(out_channels, _module_of(node))
            self.graph.group(gid).unsafe.append("produced by a grouped convolution")
            out[1] = (Segment(0, out_channels, gid, 0),)
        for seg in out[1]:
            self.graph.add_member(seg, wname, 0)
            if bname is not None:
                self.graph.add_member(seg, bname, 0)
        return out

    def op_embedding(self, node, shape):
        w = node.args[0]
        wname = self.use(w, node)
        if wname is None or shape is None:
            return None
        gid = self.graph.new_group(shape[-1], _module_of(node))
        seg = Segment(0, shape[-1], gid, 0)
        self.graph.add_member(seg, wname, 1)
        return [()] * (len(shape) - 1) + [(seg,)]

    def op_batch_norm(self, node, shape):
        x = node.args[0]
        xs = self.segs(x)
        for arg in node.args[1:5]:
            name = self.use(arg, node)
            if name is not None:
                for seg in xs[1]:
                    self.graph.add_member(seg, name, 0)
        return list(xs)

    op__native_batch_norm_legit_no_training = op_batch_norm

    def op_layer_norm(self, node, shape):
        x, normalized = node.args[0], node.args[1]
        xs = self.segs(x)
        if len(normalized) != 1:
            return None
        for arg in node.args[2:4]:
            name = self.use(arg, node)
            if name is not None:
                for seg in xs[-1]:
                    self.graph.add_member(seg, name, 0)
        return list(xs)

    # -- layout
    def op_cat(self, node, shape):
        tensors, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
        if shape is None:
            return None
        dim %= len(shape)
        out: list[Segments] = [()] * len(shape)
        offset = 0
        for t in tensors:
            segs = self.segs(t)
            t_shape = _shape(t)
            if t_shape is None:
                return None
            out[dim] = out[dim] + _shift(segs[dim], offset)
            offset += t_shape[dim]
        for d in range(len(shape)):  # along every other dim the pieces must agree
            if d == dim or shape[d] == 1:
                continue
            tracked = [self.segs(t)[d] for t in tensors if self.segs(t)[d]]
            if not tracked:
                continue
            joined = tracked[0]
            for other in tracked[1:]:
                joined = self.join(joined, other)
            for t in tensors:
                if self.segs(t)[d]:
                    continue
                origin = self.origin(t, d)
                if origin is None:  # shrinking the others would leave this piece wider
                    self.graph.mark_unsafe(joined, "cat joins its channels with a tensor the graph does not track")
                else:  # a parameter's piece (a class token): it shrinks with them
                    for seg in joined:
                        self.graph.add_member(seg, *origin)
                    self.modelled_uses.setdefault(origin[0], set()).add(node)
            out[d] = self.segs_now(joined)
        return out

    op_concat = op_cat

    def _split(self, node, sizes: list[int], dim: int):
        segs = self.segs(node.args[0])
        dim %= len(segs) if segs else 1
        pieces, start = [], 0
        for size in sizes:
            part = list(segs)
            cut = _cut(segs[dim], start, start + size) if segs else ()
            if cut is None:
                return None
            if segs:
                part[dim] = cut
            pieces.append(part)
            start += size
        return pieces

    def op_split(self, node, shape):
        x, size = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else 0
        total = (_shape(x) or (0,))[dim]
        sizes = [size] * (total // size) + ([total % size] if total % size else [])
        return self._split(node, sizes, dim)

    def op_split_with_sizes(self, node, shape):
        dim = node.args[2] if len(node.args) > 2 else 0
        return self._split(node, list(node.args[1]), dim)

    def op_chunk(self, node, shape):
        x, chunks = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else 0
        total = (_shape(x) or (0,))[dim]
        size = math.ceil(total / chunks)
        return self._split(node, [min(size, total - i) for i in range(0, total, size)], dim)

    def op_getitem(self, node, shape):
        source, index = node.args
        pieces = self.slots.get(source)
        if isinstance(pieces, list) and pieces and isinstance(pieces[0], list):
            return pieces[index]
        return [()] * (len(shape) if shape else 0) if not any(self.tracked(source)) else None

    def op_slice(self, node, shape):
        x = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else None
        step = node.args[4] if len(node.args) > 4 else 1
        segs = list(self.segs(x))
        x_shape = _shape(x)
        if x_shape is None or shape is None:
            return None
        dim %= len(x_shape)
        if not segs[dim]:
            return segs
        size = x_shape[dim]
        start = max(0, start + size if start < 0 else start)
        end = size if end is None else min(size, end + size if end < 0 else end)
        cut = _cut(segs[dim], start, end) if step == 1 else None
        if cut is None:
            return None
        segs[dim] = cut
        return segs

    def op_view(self, node, shape):
        """Any reshape (view, flatten, unflatten): the dims are cut into blocks of equal element
        count, and the one tracked dim of a block (two: not followed) is laid out flat over the
        block, then placed on one of the block's output dims (see :meth:`_placed`)."""
        x = node.args[0]
        x_shape = _shape(x)
        if x_shape is None or shape is None:
            return None
        segs = self.segs(x)
        out: list[Segments] = [()] * len(shape)
        if not any(segs):
            return out
        blocks = _blocks(x_shape, shape)
        if blocks is None:
            return None
        for (i0, i1), (o0, o1) in blocks:
            tracked = [d for d in range(i0, i1) if segs[d]]
            if not tracked:
                continue
            if len(tracked) > 1:
                return None
            t = tracked[0]
            placed = _RETRY
            for _ in range(3):  # a fold or coarsening changes the input's segments: read them again
                flat = _flattened(self.segs(x)[t], x_shape[t], math.prod(x_shape[i0:t]), math.prod(x_shape[t + 1:i1]))
                placed = self._placed(node, flat, shape[o0:o1], o0) if flat is not None else None
                if placed is not _RETRY:
                    break
            if placed is None or placed is _RETRY:
                return None
            dim, placed_segs = placed
            out[o0 + dim] = placed_segs
        return out

    op_flatten = op_view
    op_unflatten = op_view

    def _placed(self, node, segs: Segments, sizes, first_dim: int):
        """Flat segments over dims ``sizes`` of ``node`` (the output dims ``first_dim...`` of one
        block): (which of those dims carries them, its segments); None where they cannot be
        placed; ``_RETRY`` after a group was folded or coarsened to fit (the input's segments have
        changed: flatten them again).

        The channels go to the innermost dim ``j`` whose layout repeats identically for every index
        of the dims before it; the dims after it then lie within one unit: channels coarsen to
        units of that many (channels viewed as (heads, head size): whole heads). Where the layout
        repeats except that each repeat holds the next range of the same group (a fused projection
        viewed as (3, width)), and the dim before is taken apart by index (q, k and v selected),
        the group folds onto those ranges: index i of each part is one unit."""
        for j in range(len(sizes) - 1, -1, -1):
            inner = math.prod(sizes[j + 1:])
            period = sizes[j] * inner
            tiles = _tiles(segs, period, math.prod(sizes))
            if tiles is None:
                continue
            if any(t != tiles[0] for t in tiles) and j > 0 and self._foldable(tiles, period):
                if any(self._indexed_later(node, first_dim + k) for k in range(j)):
                    s = tiles[0][0]
                    if self.fold(s.group, s.length, *(t[0].first for t in tiles)):
                        return _RETRY
            if any(t != tiles[0] for t in tiles):
                continue
            unit = self._units(tiles[0], inner)
            return unit if unit is None or unit is _RETRY else (j, unit)
        return None

    def _foldable(self, tiles: list[Segments], period: int) -> bool:
        """Each tile one full-width range of one group, the ranges consecutive (0, p, 2p, ...)."""
        if any(len(t) != 1 for t in tiles):
            return False
        s0 = tiles[0][0]
        return all(t[0].start == 0 and t[0].length * t[0].repeat == period and t[0].group == s0.group
                   and t[0].repeat == s0.repeat and t[0].first == s0.first + k * s0.length
                   for k, t in enumerate(tiles))

    def _units(self, segs: Segments, inner: int):
        """``segs`` with every ``inner`` consecutive positions made one; ``_RETRY`` after
        coarsening the groups whose indices span fewer positions; None where a unit would hold
        parts of two indices."""
        if any(s.start % inner or (s.length * s.repeat) % inner for s in segs):
            return None
        finer = [s for s in segs if s.repeat % inner]
        if not finer:
            return tuple(Segment(s.start // inner, s.length, s.group, s.first, s.repeat // inner) for s in segs)
        if any(inner % s.repeat or s.first % (inner // s.repeat) or s.length % (inner // s.repeat) for s in finer):
            return None
        factors = {self.graph.find(s.group): inner // s.repeat for s in finer}
        if len(factors) < len({(self.graph.find(s.group), inner // s.repeat) for s in finer}):
            return None  # one group at two granularities
        return _RETRY if all(self.coarsen(g, f) for g, f in factors.items()) else None

    def _indexed_later(self, node, dim: int) -> bool:
        """Whether dim ``dim`` of ``node`` is, past ops that only move dims, taken apart by index
        (select, unbind): the parts of a fused projection, not heads."""
        pending = [(node, dim)]
        while pending:
            n, d = pending.pop()
            rank = len(_shape(n) or ())
            for user in n.users:
                op = _opname(user.target)
                args = user.args
                if op in ("select", "unbind"):
                    if (args[1] if len(args) > 1 else 0) % rank == d:
                        return True
                elif op == "unsqueeze":
                    pending.append((user, d + (args[1] % (rank + 1) <= d)))
                elif op == "transpose":
                    a, b = args[1] % rank, args[2] % rank
                    pending.append((user, b if d == a else a if d == b else d))
                elif op == "permute":
                    pending.append((user, [p % rank for p in args[1]].index(d)))
                elif op == "squeeze":
                    gone = _squeezed(_shape(n), args[1] if len(args) > 1 else None)
                    if d not in gone:
                        pending.append((user, d - sum(g < d for g in gone)))
                elif op in ("contiguous", "clone", "alias", "detach", "_to_copy"):
                    pending.append((user, d))
        return False

    op_reshape = op_view
    op__unsafe_view = op_view

    def op_scaled_dot_product_attention(self, node, shape):
        """Attention over (batch, heads, tokens, head size): query, key and value heads are one
        group (a key/value head with the query heads that share it, under GQA); only the heads dim
        may carry channels."""
        q, k, v = node.args[:3]
        parts = [self.segs(t) for t in (q, k, v)]
        mask = node.args[3] if len(node.args) > 3 else None
        if (shape is None or any(len(p) < 3 for p in parts)
                or any(p[d] for p in parts for d in (-2, -1))  # tokens or head size carry channels
                or any(not p[-3] for p in parts)  # a part whose heads the graph does not track
                or (isinstance(mask, torch.fx.Node) and self.tracked(mask))):
            return None
        heads = parts[0][-3]
        for other in parts[1:]:
            heads = self.join(heads, other[-3])
        heads = self.segs_now(heads)
        return [()] * (len(shape) - 3) + [heads, (), ()]

    def op_matmul(self, node, shape):
        a, b = node.args[:2]
        sa, sb = self.segs(a), self.segs(b)
        if shape is None or len(sa) < 2 or len(sb) < 2 or sa[-1] or sb[-2]:
            return None  # contracting tracked channels with something untracked
        batch = len(shape) - 2
        out: list[Segments] = [()] * len(shape)
        for k in range(1, batch + 1):
            left = sa[-2 - k] if len(sa) - 2 - k >= 0 else ()
            right = sb[-2 - k] if len(sb) - 2 - k >= 0 else ()
            out[batch - k] = self.join(left, right)
        out[-2], out[-1] = sa[-2], sb[-1]
        return [self.segs_now(o) for o in out]

    op_bmm = op_matmul

    def op_unsqueeze(self, node, shape):
        segs = list(self.segs(node.args[0]))
        if shape is None:
            return None
        dim = node.args[1] % len(shape)
        return segs[:dim] + [()] + segs[dim:]

    def op_squeeze(self, node, shape):
        x_shape = _shape(node.args[0])
        if x_shape is None or shape is None:
            return None
        segs = self.segs(node.args[0])
        if len(shape) == len(x_shape):
            return list(segs)
        gone = _squeezed(x_shape, node.args[1] if len(node.args) > 1 else None)
        return [s for d, s in enumerate(segs) if d not in gone]

    def op_permute(self, node, shape):
        segs = self.segs(node.args[0])
        return [segs[d % len(segs)] for d in node.args[1]]

    def op_transpose(self, node, shape):
        segs = list(self.segs(node.args[0]))
        a, b = node.args[1] % len(segs), node.args[2] % len(segs)
        segs[a], segs[b] = segs[b], segs[a]
        return segs

    def op_t(self, node, shape):
        return list(reversed(self.segs(node.args[0])))

    def op_expand(self, node, shape):
        segs = self.segs(node.args[0])
        if shape is None:
            return None
        return [()] * (len(shape) - len(segs)) + list(segs)

    def op_unbind(self, node, shape):
        segs = list(self.segs(node.args[0]))
        x_shape = _shape(node.args[0])
        if not segs or x_shape is None:
            return None
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(segs)
        if segs[dim]:
            return None
        return [segs[:dim] + segs[dim + 1:] for _ in range(x_shape[dim])]

    def op_select(self, node, shape):
        segs = list(self.segs(node.args[0]))
        dim = node.args[1] % len(segs)
        if segs[dim]:
            return None
        return segs[:dim] + segs[dim + 1:]

    def op_softmax(self, node, shape):
        segs = self.segs(node.args[0])
        dim = node.args[1] % len(segs) if segs else 0
        return None if segs and segs[dim] else list(segs)

    op__softmax = op_softmax
    op_log_softmax = op_softmax

    def op_mean(self, node, shape):
        x = node.args[0]
        segs = self.segs(x)
        dims = node.args[1] if len(node.args) > 1 else None
        keepdim = node.args[2] if len(node.args) > 2 else False
        if dims is None or shape is None:
            return None
        dims = {d % len(segs) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        # A statistic over the channels themselves (RMSNorm's mean of squares, like LayerNorm's)
        # carries no channel layout on: removing channels changes its value, not its shape.
        return [s if d not in dims else () for d, s in enumerate(segs) if keepdim or d not in dims]

    op_sum = op_mean
    op_amax = op_mean

    # -- parameters used in ways the graph did not model
    def check_parameter_uses(self) -> None:
        members: dict[str, list[int]] = {}
        for g in self.graph.groups:
            for m in g.members:
                members.setdefault(m.name, []).append(g.id)
        for node, (name, _) in self.derived.items():  # the parameter and what it was reshaped into
            if name not in members:
                continue
            unmodelled = [u for u in node.users if u not in self.modelled_uses.get(name, set())]
            if unmodelled:
                for gid in members[name]:
                    reason = f"{name} is also used by {_opname(unmodelled[0].target)}"
                    if reason not in self.graph.group(gid).unsafe:
                        self.graph.group(gid).unsafe.append(reason)
        # Two groups on one parameter dimension: fine on disjoint ranges (a concat's inputs); the
        # same channels slicing it the same way are one group (tied weights); anything else
        # cannot be sliced consistently.
        spans: dict[tuple[str, int], list[tuple[Member, int]]] = {}
        for g in list(self.graph.groups):
            for m in g.members:
                spans.setdefault((m.name, m.dim), []).append((m, g.id))
        for entries in spans.values():
            for i, (a, ga) in enumerate(entries):
                for b, gb in entries[i + 1:]:
                    if self.graph.find(ga) == self.graph.find(gb):
                        continue
                    if a.offset + a.length * a.repeat <= b.offset or b.offset + b.length * b.repeat <= a.offset:
                        continue
                    same = (a.offset, a.repeat, a.length, a.first) == (b.offset, b.repeat, b.length, b.first)
                    if same and self.graph.group(ga).size == self.graph.group(gb).size:
                        self.graph.union(ga, gb)
                    else:
                        for gid in (ga, gb):
                            reason = f"{a.name} is sliced differently by two channel groups"
                            if reason not in self.graph.group(gid).unsafe:
                                self.graph.group(gid).unsafe.append(reason)


def build_graph(model: nn.Module, args: tuple = (), kwargs: Optional[dict] = None) -> DependencyGraph:
    """Trace ``model(*args, **kwargs)`` and return its channel groups (nothing is modified)."""
    program = trace(model, tuple(args), dict(kwargs or {}))
    graph = _Propagator(program, model).run()
    for name, module in model.named_modules():
        reason = supports_head_removal(module) if isinstance(module, nn.MultiheadAttention) else None
        if reason:  # its forward could not run the narrower projections
            for g in graph.groups:
                if any(m.name.startswith(f"{name}.") for m in g.members) and reason not in g.unsafe:
                    g.unsafe.append(reason)
    return graph
