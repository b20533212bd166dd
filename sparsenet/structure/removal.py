"""Physical removal: slice every member of a group, then make the modules agree with their tensors.

New, smaller tensors replace the old ones under every name that shares them (tied weights stay
tied); the modules' size attributes (``in_features``, ``out_channels``, ``num_features``,
``normalized_shape``, a depthwise convolution's ``groups``, ...) are then read back from their
tensors. :func:`remove_channels` is all or nothing: on any error the model is restored.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .._sizes import HEAD_COUNT_ATTRIBUTES, SIZE_ATTRIBUTES, fix_head_counts, fix_sizes
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


# Every attribute removal may change: restored, with the module's class, when it fails.
_CHANGED = (*SIZE_ATTRIBUTES, *HEAD_COUNT_ATTRIBUTES, "_qkv_same_embed_dim", "use_nested_tensor")


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
