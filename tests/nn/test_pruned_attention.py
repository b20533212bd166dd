"""HeadPrunedMultiheadAttention: torch's nn.MultiheadAttention computation over fewer heads.

At full width it must give exactly torch's results for every argument torch takes; with heads
sliced away it must equal torch's attention with those heads' contribution zeroed."""
import itertools

import pytest
import torch
from torch import nn

from sparsenet.nn.attention import HeadPrunedMultiheadAttention, fit_attention_class

E, HEADS = 16, 4


def twins(batch_first, dropout=0.0):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, HEADS, dropout=dropout, batch_first=batch_first).eval()
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    ours = HeadPrunedMultiheadAttention(E, HEADS, dropout=dropout, batch_first=batch_first).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def masks(kind, batch, tokens):
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return {}
    if kind == "padding_bool":
        pad = torch.zeros(batch, tokens, dtype=torch.bool)
        pad[:, -2:] = True
        return {"key_padding_mask": pad}
    if kind == "attn_float":
        return {"attn_mask": torch.randn(tokens, tokens, generator=g)}
    if kind == "attn_bool_per_head":
        m = torch.rand(batch * HEADS, tokens, tokens, generator=g) > 0.7
        m[..., 0] = False  # every query keeps one key (a row of -inf is NaN in both)
        return {"attn_mask": m}
    if kind == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(tokens), "is_causal": True}
    if kind == "both":
        pad = torch.zeros(batch, tokens)
        pad[:, -1] = float("-inf")
        return {"key_padding_mask": pad, "attn_mask": torch.randn(tokens, tokens, generator=g)}
    raise AssertionError(kind)


MASKS = ["none", "padding_bool", "attn_float", "attn_bool_per_head", "causal", "both"]


@pytest.mark.parametrize("batch_first,need_weights,average,mask",
                         list(itertools.product([True, False], [True, False], [True, False], MASKS)))
def test_full_width_matches_torch(batch_first, need_weights, average, mask):
    reference, ours = twins(batch_first)
    batch, tokens = 3, 6
    x = torch.randn((batch, tokens, E) if batch_first else (tokens, batch, E))
    kwargs = dict(need_weights=need_weights, average_attn_weights=average, **masks(mask, batch, tokens))
    want, want_w = reference(x, x, x, **kwargs)
    got, got_w = ours(x, x, x, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_and_unbatched_inputs_match_torch(batch_first):
    reference, ours = twins(batch_first)
    q = torch.randn((2, 5, E) if batch_first else (5, 2, E))
    kv = torch.randn((2, 7, E) if batch_first else (7, 2, E))
    for args in ((q, kv, kv), (q, kv, kv.flip(0))):
        torch.testing.assert_close(ours(*args)[0], reference(*args)[0], rtol=1e-5, atol=1e-5)
    single = torch.randn(5, E)  # unbatched: (tokens, embed) whatever batch_first says
    pad = torch.tensor([False, False, False, True, False])
    for kwargs in ({}, {"key_padding_mask": pad}):
        want, want_w = reference(single, single, single, **kwargs)
        got, got_w = ours(single, single, single, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_removed_heads_equal_zeroed_heads_and_the_rest_are_unchanged():
    reference, _ = twins(True)
    keep, head_dim = [0, 2], E // HEADS
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
    packed = torch.cat([rows + part * E for part in range(3)])
    pruned = HeadPrunedMultiheadAttention(E, HEADS, batch_first=True).eval()
    with torch.no_grad():
        pruned.in_proj_weight = nn.Parameter(reference.in_proj_weight[packed].clone())
        pruned.in_proj_bias = nn.Parameter(reference.in_proj_bias[packed].clone())
        pruned.out_proj = nn.Linear(len(rows), E)
        pruned.out_proj.weight.copy_(reference.out_proj.weight[:, rows])
        pruned.out_proj.bias.copy_(reference.out_proj.bias)
    fit_attention_class(pruned)
    assert type(pruned) is HeadPrunedMultiheadAttention and pruned.num_heads == 2
    assert not pruned._qkv_same_embed_dim  # transformer layers' fused fast path is off

    x = torch.randn(2, 6, E)
    zeroed = [h for h in range(HEADS) if h not in keep]
    with torch.no_grad():
        for h in zeroed:
            reference.out_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
    want, want_w = reference(x, x, x, average_attn_weights=False)
    got, got_w = pruned(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, want_w[:, keep], rtol=1e-5, atol=1e-6)
    fast, _ = pruned(x, x, x, need_weights=False)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)


def test_full_width_restores_torch_class_and_bad_masks_are_clear_errors():
    _, ours = twins(True)
    fit_attention_class(ours)
    assert type(ours) is nn.MultiheadAttention and ours._qkv_same_embed_dim
    pruned = HeadPrunedMultiheadAttention(E, HEADS, batch_first=True)
    x = torch.randn(2, 6, E)
    with pytest.raises(RuntimeError, match="attn_mask of shape"):
        pruned(x, x, x, attn_mask=torch.zeros(2 * HEADS + 1, 6, 6))
    with pytest.raises(RuntimeError, match="key_padding_mask of shape"):
        pruned(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating-point"):
        pruned(x, x, x, attn_mask=torch.zeros(6, 6, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="is_causal needs attn_mask"):
        pruned(x, x, x, is_causal=True)
