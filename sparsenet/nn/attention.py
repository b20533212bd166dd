"""``nn.MultiheadAttention`` with heads removed.

torch's own forward assumes the projections are exactly ``embed_dim`` wide (``head_dim = embed_dim
// num_heads``), so once :func:`sparsenet.shrink` removes heads it can no longer run them. This
subclass computes the same attention over ``num_heads * head_dim`` channels and takes the same
arguments; a model keeps calling it as before, and ``isinstance(m, nn.MultiheadAttention)`` holds.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supports_head_removal(module: nn.MultiheadAttention) -> Optional[str]:
    """Why the heads of ``module`` cannot be removed, or None when they can: the rebuilt forward
    covers the packed projection (query, key and value of one width) without extra key/value
    biases or zero attention."""
    if not module._qkv_same_embed_dim:
        return "nn.MultiheadAttention with kdim/vdim other than embed_dim keeps its heads"
    if module.bias_k is not None or module.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn keeps its heads"
    return None


def fit_attention_class(module: nn.MultiheadAttention) -> None:
    """Set ``num_heads`` from the packed projection's width and give the module the forward that
    width needs: torch's own at full width, :class:`HeadPrunedMultiheadAttention` below it."""
    inner = module.in_proj_weight.shape[0] // 3
    module.num_heads = inner // module.head_dim
    full = inner == module.embed_dim
    module.__class__ = nn.MultiheadAttention if full else HeadPrunedMultiheadAttention
    # Transformer layers take a fused fast path that reads the packed weights at full width; this
    # flag (true of every packed projection torch builds) is what they check before taking it.
    module._qkv_same_embed_dim = full


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed projection holds ``num_heads * head_dim`` (fewer than
    ``embed_dim``) output channels per query, key and value; ``out_proj`` maps them back to
    ``embed_dim``. Arguments, masks and results as torch's; a 3-D ``attn_mask`` must be given per
    remaining head (``batch * num_heads`` of them)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if batched and self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:  # (tokens, embed): a batch of one, as torch treats it
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tokens, batch, _ = query.shape
        sources = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        if self_attention:  # one projection, split as torch splits it (the trace sees the same ops)
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, inner)).unbind(-2)
        else:
            weights = self.in_proj_weight.split(inner)
            biases = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases))
        q = q.reshape(tokens, batch, heads, head_dim).permute(1, 2, 0, 3)  # (batch, heads, tokens, head_dim)
        k = k.reshape(sources, batch, heads, head_dim).permute(1, 2, 0, 3)
        v = v.reshape(sources, batch, heads, head_dim).permute(1, 2, 0, 3)

        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask, as for nn.MultiheadAttention (see "
                               "nn.Transformer.generate_square_subsequent_mask)")
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = self._additive_mask(None if causal else attn_mask, key_padding_mask, batch, tokens, sources, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p=dropout) if dropout else scores.softmax(dim=-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tokens * batch, inner)).view(tokens, batch, -1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _additive_mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int,
                       tokens: int, sources: int, dtype: torch.dtype) -> Optional[Tensor]:
        """Both masks as one float mask to add to the scores, broadcastable to (batch, heads, tokens,
        sources): True in a boolean mask means "not attended", as in torch."""
        mask = None
        if attn_mask is not None:
            attn_mask = _as_additive(attn_mask, dtype, "attn_mask")
            if attn_mask.dim() == 2 and attn_mask.shape == (tokens, sources):
                mask = attn_mask
            elif attn_mask.dim() == 3 and attn_mask.shape == (batch * self.num_heads, tokens, sources):
                mask = attn_mask.view(batch, self.num_heads, tokens, sources)
            else:
                raise RuntimeError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} does not fit: expected ({tokens}, {sources}) or "
                    f"({batch * self.num_heads}, {tokens}, {sources}) (batch x the {self.num_heads} heads left after "
                    "heads were removed)")
        if key_padding_mask is not None:
            key_padding_mask = _as_additive(key_padding_mask, dtype, "key_padding_mask")
            if key_padding_mask.shape != (batch, sources):
                raise RuntimeError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not fit: "
                                   f"expected ({batch}, {sources})")
            padding = key_padding_mask.view(batch, 1, 1, sources)
            mask = padding if mask is None else mask + padding
        return mask


def _as_additive(mask: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)
