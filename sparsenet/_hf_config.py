"""A Hugging Face model's ``config`` brought in line with its shrunk modules where it can be.

A config holds one width per kind of layer (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``) for every layer at once, and some widths follow from others (BERT's head
size is ``hidden_size / num_attention_heads``). So a field is changed only when every layer now has
one same new value *and* a model built from the changed config has exactly the shrunk shapes in the
tensors that field governs: built on the meta device and compared. Otherwise the field keeps its
value and the report says why; the saved file then loads into a model built from the original
config (``sparsenet.load`` narrows it), as it always does.

A leaf module: ``shrink`` and ``sparsenet.load`` both use it.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Optional

import torch
from torch import nn

from ._sizes import head_counts, out_width
from .nn.hf import _looks_like_pretrained_model

FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "d_ff")
HEAD_FIELDS = ("num_attention_heads", "n_head")
KV_FIELDS = ("num_key_value_heads",)
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model", "dim")


def _config(model: nn.Module) -> Optional[Any]:
    return model.config if _looks_like_pretrained_model(model) else None


def ffn_layers(model: nn.Module) -> dict[str, list[str]]:
    """Before shrinking: per feed-forward width field of the config, the layers whose output
    width is that value (the up projections it sets), by name."""
    config = _config(model)
    if config is None:
        return {}
    found: dict[str, list[str]] = {}
    for field in FFN_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            found[field] = [n for n, m in model.named_modules() if out_width(m) == value]
    return {f: names for f, names in found.items() if names}


def sync_config(model: nn.Module, ffn: dict[str, list[str]]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Set the config fields that describe the shrunk model exactly (see the module's doc);
    returns {field: (old, new)} for those changed and a note for each field left as it was."""
    config = _config(model)
    if config is None:
        return {}, []
    modules = dict(model.named_modules())
    values: dict[str, set[int]] = {f: {out_width(modules[n]) for n in names} for f, names in ffn.items()}
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if isinstance(embeddings, nn.Embedding):  # the residual stream's width
        for field in HIDDEN_FIELDS:
            if isinstance(getattr(config, field, None), int):
                values[field] = {embeddings.embedding_dim}
    counts = [c for c in map(head_counts, model.modules()) if c is not None]
    for fields, pick in ((HEAD_FIELDS, 0), (KV_FIELDS, 1)):
        for field in fields:
            if isinstance(getattr(config, field, None), int) and counts:
                values[field] = {c[pick] for c in counts}

    aliases = getattr(config, "attribute_map", {}) or {}  # GPT-2's hidden_size is its n_embd
    values = {f: v for f, v in values.items() if f not in aliases}
    wanted, notes = {}, []
    for field, found in values.items():
        old = getattr(config, field)
        if found == {old}:
            continue
        if len(found) > 1:
            notes.append(f"config.{field} left at {old}: the layers now differ ({min(found)} to {max(found)})")
        else:
            wanted[field] = found.pop()
    if not wanted:
        return {}, notes
    try:
        changed = _largest_exact_change(model, config, wanted)
    except Exception as e:  # noqa: BLE001 (a model that cannot be built on the meta device: leave the config)
        return {}, notes + [f"config left as it was: the model could not be rebuilt from it to check "
                            f"({type(e).__name__}: {e})"]
    for field, value in wanted.items():
        if field not in changed:
            notes.append(f"config.{field} left at {getattr(config, field)}: a model built with {field}={value} "
                         "would not have the shrunk shapes (other sizes follow from it)")
    if changed:
        # A new config object in place of the old wherever the model holds it: another model
        # built from the same config object keeps the widths it has.
        fitted = copy.deepcopy(config)
        for field, value in changed.items():
            setattr(fitted, field, value)
        for module in model.modules():
            if vars(module).get("config") is config:
                module.config = fitted
    return {field: (getattr(config, field), value) for field, value in changed.items()}, notes


def _largest_exact_change(model: nn.Module, config, wanted: dict[str, int]) -> dict[str, int]:
    """The largest set of ``wanted`` field values (fields interact: BERT's head size is
    hidden_size / num_attention_heads) with which a model built from the config has exactly the
    shrunk shapes in every tensor those fields change."""
    base = _signature_from(config, type(model))
    shrunk = _signature(model)
    fields = list(wanted)
    sizes = range(len(fields), 0, -1) if len(fields) <= 5 else (len(fields), 1)
    for size in sizes:
        for subset in itertools.combinations(fields, size):
            trial = copy.deepcopy(config)
            for field in subset:
                setattr(trial, field, wanted[field])
            try:
                signature = _signature_from(trial, type(model))
            except ValueError:  # a config the model refuses (heads that do not divide the width)
                continue
            governed = {n: s for n, s in signature.items() if base.get(n) != s}
            if governed and all(shrunk.get(n) == s for n, s in governed.items()):
                return {field: wanted[field] for field in subset}
    return {}


def _signature(model: nn.Module) -> dict[tuple[str, str], tuple[int, ...]]:
    """Every tensor's shape and every attention module's (heads, key/value heads, head size): what
    a config must reproduce (fewer heads of another size can have the same shapes)."""
    sig = {("shape", n): tuple(t.shape) for n, t in model.state_dict().items()}
    sig.update({("heads", n): c for n, m in model.named_modules() if (c := head_counts(m)) is not None})
    return sig


def _signature_from(config, cls) -> dict[tuple[str, str], tuple[int, ...]]:
    with torch.device("meta"):
        model = cls(config)
    return _signature(model)
