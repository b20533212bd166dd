"""The widths of modules: read from their tensors, recorded, and the tensor shapes at recorded widths.

Shrinking changes a module's tensors and then sets its size attributes (``in_features``,
``out_channels``, an attention module's head counts, ...) from them here; ``sparsenet.save``
records those sizes and ``sparsenet.load`` rebuilds a plain model's modules at them. A leaf module
(torch and the attention module class only), so that io needs no structure package.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ._weights import is_conv1d
from .nn.attention import HeadPrunedMultiheadAttention, fit_attention_class


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


SIZE_ATTRIBUTES = ("in_features", "out_features", "nf", "nx", "in_channels", "out_channels", "groups",
                    "num_features", "normalized_shape", "embedding_dim")


# An attention module's head counts, read back from its projections (Hugging Face names them so).
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "all_head_size", "num_key_value_heads", "split_size")


def out_width(layer: nn.Module) -> Optional[int]:
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
    if isinstance(fused, nn.Module) and out_width(fused) and out_width(fused) % (3 * head) == 0:
        heads = out_width(fused) // 3 // head
        return heads, heads, head
    query = next((getattr(module, a) for a in ("query", "q_proj") if isinstance(getattr(module, a, None), nn.Module)), None)
    key = next((getattr(module, a) for a in ("key", "k_proj") if isinstance(getattr(module, a, None), nn.Module)), None)
    widths = [out_width(p) if p is not None else None for p in (query, key)]
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
    return {a: getattr(module, a) for a in SIZE_ATTRIBUTES if a in vars(module)}


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
