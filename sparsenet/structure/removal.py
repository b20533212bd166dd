"""Physical removal: slice every member of a group, then make the modules agree with their tensors.

New, smaller tensors replace the old ones under every name that shares them (tied weights stay
tied); the modules' size attributes (``in_features``, ``out_channels``, ``num_features``,
``normalized_shape``, a depthwise convolution's ``groups``, ...) are then read back from their
tensors. :func:`remove_channels` is all or nothing: on any error the model is restored.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .._weights import is_conv1d
from ..nn.attention import HeadPrunedMultiheadAttention, fit_attention_class
from .graph import DependencyGraph


def positions(graph: DependencyGraph, removed: dict[int, Tensor]) -> dict[tuple[str, int], Tensor]:
    """(tensor name, dim) -> sorted positions to drop there, from group indices to remove."""
    drops: dict[tuple[str, int], list[Tensor]] = {}
    for gid, indices in removed.items():
        if indices.numel() == 0:
            continue
        for m in graph.group(gid).members:
            inside = indices[(indices >= m.first) & (indices < m.first + m.length)] - m.first
            if inside.numel() == 0:
                continue
            starts = m.offset + inside * m.repeat
            spread = (starts[:, None] + torch.arange(m.repeat)[None, :]).reshape(-1)
            drops.setdefault((m.name, m.dim), []).append(spread)
    return {key: torch.unique(torch.cat(parts)) for key, parts in drops.items()}


def _holders(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Tensor name (as in state_dict) -> every (module, attribute) that holds that tensor."""
    by_tensor: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[str, list[tuple[nn.Module, str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for registry in (module._parameters, module._buffers):
            for attr, t in registry.items():
                if t is None:
                    continue
                holders = by_tensor.setdefault(id(t), [])
                if not any(m is module and a == attr for m, a in holders):
                    holders.append((module, attr))
                names[f"{prefix}.{attr}" if prefix else attr] = holders
    return names


def fix_sizes(module: nn.Module) -> None:
    """Size attributes read back from the (possibly sliced) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif is_conv1d(module):
        module.nf = module.weight.shape[1]
        if hasattr(module, "nx"):
            module.nx = module.weight.shape[0]
    elif isinstance(module, nn.Conv2d):
        out_channels, per_group = module.weight.shape[:2]
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = out_channels  # depthwise stays depthwise
        module.out_channels, module.in_channels = out_channels, per_group * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        fit_attention_class(module)


_SIZE_ATTRIBUTES = ("in_features", "out_features", "nf", "nx", "in_channels", "out_channels", "groups",
                    "num_features", "normalized_shape", "embedding_dim")


# An attention module's head counts, read back from its projections (Hugging Face names them so).
_HEAD_COUNTS = ("num_attention_heads", "num_heads", "all_head_size", "num_key_value_heads", "split_size")


def _out_features(layer: nn.Module) -> Optional[int]:
    width = getattr(layer, "out_features", None)  # nn.Linear, SparseLinear
    if width is None and is_conv1d(layer):
        width = layer.weight.shape[1]
    return width if isinstance(width, int) else None


def head_counts(module: nn.Module) -> Optional[tuple[int, int, int]]:
    """(query heads, key/value heads, head size) of a Hugging Face style attention module, read
    from its projections (``query``/``q_proj``, ``key``/``k_proj``, or GPT-2's fused ``c_attn``);
    None for any other module."""
    head = next((v for v in (getattr(module, a, None) for a in ("attention_head_size", "head_dim"))
                 if isinstance(v, int) and v > 0), None)
    if head is None:
        return None
    fused = getattr(module, "c_attn", None)  # GPT-2: one projection for query, key and value
    if isinstance(fused, nn.Module) and _out_features(fused) and _out_features(fused) % (3 * head) == 0:
        heads = _out_features(fused) // 3 // head
        return heads, heads, head
    query = next((getattr(module, a) for a in ("query", "q_proj") if isinstance(getattr(module, a, None), nn.Module)), None)
    key = next((getattr(module, a) for a in ("key", "k_proj") if isinstance(getattr(module, a, None), nn.Module)), None)
    widths = [_out_features(p) if p is not None else None for p in (query, key)]
    if widths[0] is None or widths[0] % head or (widths[1] is not None and widths[1] % head):
        return None
    return widths[0] // head, (widths[1] or widths[0]) // head, head


def fix_head_counts(module: nn.Module) -> None:
    """Head counts of an attention module (``num_attention_heads``, ``all_head_size``, ...) from its
    query / key projections and its head size, so they never go stale after heads are removed."""
    if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, HeadPrunedMultiheadAttention) for m in module.modules()):
        # Its fast path checks only the first layer before handing every layer nested tensors,
        # which the rebuilt attention does not take.
        module.use_nested_tensor = False
        return
    counts = head_counts(module)
    if counts is None:
        return
    heads, kv_heads, head = counts
    if "split_size" in vars(module):  # GPT-2 splits its fused projection at this width
        module.split_size = heads * head
    for attr, value in (("num_attention_heads", heads), ("num_heads", heads), ("all_head_size", heads * head),
                        ("num_key_value_heads", kv_heads)):
        if attr in vars(module):
            setattr(module, attr, value)


def module_sizes(module: nn.Module) -> dict[str, object]:
    if isinstance(module, nn.MultiheadAttention):
        return {"num_heads": module.num_heads}
    return {a: getattr(module, a) for a in _SIZE_ATTRIBUTES if a in vars(module)}


# Every attribute removal may change: restored, with the module's class, when it fails.
_CHANGED = (*_SIZE_ATTRIBUTES, *_HEAD_COUNTS, "_qkv_same_embed_dim", "use_nested_tensor")


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, type, dict]]:
    return [(m, type(m), {a: vars(m)[a] for a in _CHANGED if a in vars(m)}) for m in model.modules()]


def remove_channels(model: nn.Module, graph: DependencyGraph, removed: dict[int, Tensor],
                    check: Callable[[], None]) -> dict[str, tuple[int, ...]]:
    """Drop group indices ``removed[g]`` from every member of each group, then run ``check`` (a
    forward on the example inputs); restore everything and re-raise if either fails. Returns the
    new shape of each tensor that changed, by name."""
    holders = _holders(model)
    by_name: dict[str, list[tuple[int, Tensor]]] = {}
    for (name, dim), drop in positions(graph, removed).items():
        by_name.setdefault(name, []).append((dim, drop))
    saved_tensors: list[tuple[dict, str, Tensor]] = []  # (registry, attribute, old tensor)
    saved_modules = _snapshot(model)
    resized: dict[int, nn.Module] = {}
    changed: dict[str, tuple[int, ...]] = {}
    done: set[int] = set()  # a tensor shared under several names is sliced once
    try:
        for name, cuts in by_name.items():
            module, attr = holders[name][0]
            old = getattr(module, attr)
            if id(old) in done:
                continue
            done.add(id(old))
            new = _sliced(old, cuts)
            for holder, holder_attr in holders[name]:
                registry = holder._parameters if holder_attr in holder._parameters else holder._buffers
                saved_tensors.append((registry, holder_attr, registry[holder_attr]))
                resized[id(holder)] = holder
                registry[holder_attr] = new
            changed[name] = tuple(new.shape)
        for holder in resized.values():
            fix_sizes(holder)
        for module in model.modules():
            fix_head_counts(module)
        check()
    except BaseException:
        for registry, attr, old in reversed(saved_tensors):
            registry[attr] = old
        for module, kind, attributes in saved_modules:
            module.__class__ = kind
            vars(module).update(attributes)
        raise
    return changed


def _sliced(old: Tensor, cuts: list[tuple[int, Tensor]]) -> Tensor:
    """``old`` without positions ``drop`` along each ``dim`` of ``cuts``; a Parameter stays one."""
    new = old.detach()
    for dim, drop in cuts:
        keep = torch.ones(new.shape[dim], dtype=torch.bool)
        keep[drop] = False
        new = new.index_select(dim, keep.nonzero().reshape(-1).to(new.device))
    new = new.clone()
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new, requires_grad=old.requires_grad)
    return new


def shapes_at(module: nn.Module, sizes: dict) -> Optional[dict[str, tuple[int, ...]]]:
    """The shape of each of ``module``'s tensors at ``sizes`` (the inverse of ``fix_sizes``), or
    None for a module that is not resized."""
    if isinstance(module, nn.Linear):
        return {"weight": (sizes["out_features"], sizes["in_features"]), "bias": (sizes["out_features"],)}
    if is_conv1d(module):  # weight stored (in, out)
        return {"weight": (sizes.get("nx", module.weight.shape[0]), sizes["nf"]), "bias": (sizes["nf"],)}
    if isinstance(module, nn.Conv2d):
        out, per_group = sizes["out_channels"], sizes["in_channels"] // sizes["groups"]
        return {"weight": (out, per_group, *module.weight.shape[2:]), "bias": (out,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        n = (sizes["num_features"],)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    if isinstance(module, nn.LayerNorm):
        return {"weight": tuple(sizes["normalized_shape"]), "bias": tuple(sizes["normalized_shape"])}
    if isinstance(module, nn.Embedding):
        return {"weight": (module.weight.shape[0], sizes["embedding_dim"])}
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        inner = sizes["num_heads"] * module.head_dim
        return {"in_proj_weight": (3 * inner, module.embed_dim), "in_proj_bias": (3 * inner,)}
    return None
