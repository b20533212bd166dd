"""sparsenet.shrink on real architectures (small configs, random weights): heads, FFNs, channels
really removed; ratio 0 changes nothing; the shrunk model runs, exports and generates."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsenet
from sparsenet.nn.attention import HeadPrunedMultiheadAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the architecture builders
from test_architectures import MobileNetV2, ResNet18, bert, gpt2, llama, vit  # noqa: E402
from models import DenseBlock  # noqa: E402


def tokens(causal):
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, **({"use_cache": False} if causal else {})}


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)

    def forward(self, x):
        return self.layer(x)


CASES = {
    "bert": (bert, lambda: tokens(False)),
    "vit": (vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}),
    "llama_gqa": (llama, lambda: tokens(True)),
    "gpt2": (gpt2, lambda: tokens(True)),
    "resnet18": (ResNet18, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    "mobilenetv2": (MobileNetV2, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    "densenet_block": (DenseBlock, lambda: {"x": torch.randn(2, 3, 8, 8)}),
    "transformer_encoder_layer": (Encoder, lambda: {"x": torch.randn(2, 5, 32)}),
}


def output(model, batch):
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def built(build):
    torch.manual_seed(0)
    return build().eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_ratio_zero_is_bit_identical(name):
    build, batch = CASES[name]
    model, x = built(build), batch()
    with torch.no_grad():
        expected = output(model, x)
    sparsenet.shrink(model, x, 0.0)
    with torch.no_grad():
        assert torch.equal(output(model, x), expected)


def attention_heads(model):
    """Query heads per attention module, read from the query projection's rows."""
    heads = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[name] = m.in_proj_weight.shape[0] // 3 // m.head_dim
            continue
        q = getattr(m, "query", None) or getattr(m, "q_proj", None)
        head_dim = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None)
        if isinstance(q, nn.Linear) and head_dim:
            heads[name] = q.out_features // head_dim
    return heads


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_the_shrinkable_parameters_really_go(name):
    build, batch = CASES[name]
    model, x = built(build), batch()
    heads_before = attention_heads(model)
    report = sparsenet.shrink(model, x, 0.5)
    assert report.shrinkable_after <= 0.6 * report.shrinkable_before, str(report)
    assert sum(p.numel() for p in model.parameters()) == report.params_after
    with torch.no_grad():
        assert torch.isfinite(output(model, x)).all()
    heads_after = attention_heads(model)
    for module, before in heads_before.items():  # every eligible attention layer lost heads
        assert heads_after[module] < before, (module, heads_after)
    torch.export.export(model, (), x, strict=False)
    if name in ("llama_gqa", "gpt2"):
        prompt = x["input_ids"][:, :4]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        assert out.shape == (2, 7)


def test_gqa_keeps_each_key_value_head_with_its_query_heads():
    model = built(llama)
    attn = model.model.layers[0].self_attn
    groups = attn.num_key_value_groups
    sparsenet.shrink(model, tokens(True), 0.5)
    kv_heads = attn.k_proj.out_features // attn.head_dim
    assert attn.v_proj.out_features == attn.k_proj.out_features
    assert attn.q_proj.out_features == kv_heads * groups * attn.head_dim  # query heads follow their kv head
    assert attn.o_proj.in_features == attn.q_proj.out_features


def test_transformer_encoder_layer_loses_heads_and_feed_forward_neurons():
    model = built(Encoder)
    sparsenet.shrink(model, {"x": torch.randn(2, 5, 32)}, 0.5)
    attn = model.layer.self_attn
    assert model.layer.linear1.out_features < 64 and model.layer.linear2.in_features == model.layer.linear1.out_features
    assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads < 4
    assert attn.in_proj_weight.shape == (3 * attn.num_heads * attn.head_dim, 32)
    assert attn.out_proj.in_features == attn.num_heads * attn.head_dim and attn.embed_dim == 32


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                             enable_nested_tensor=True)

    def forward(self, x, pad):
        return self.encoder(x, src_key_padding_mask=pad)


def test_transformer_encoder_with_padding_runs_saves_and_loads_after_losing_heads(tmp_path):
    # Evaluated without grad with a padding mask, torch's encoder takes its fused, nested-tensor
    # fast path; a layer whose heads were removed must leave it.
    model, x = built(Stack), torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    exclude = ["encoder.layers.0.self_attn"]  # the first layer (the one the fast path checks) keeps its heads
    sparsenet.shrink(model, {"x": x, "pad": pad}, 0.5, exclude=exclude)
    heads = attention_heads(model)
    assert heads["encoder.layers.0.self_attn"] == 4 and heads["encoder.layers.1.self_attn"] < 4
    with torch.no_grad():
        fast = model(x, pad)
    slow = model(x, pad)  # with grad: the plain path
    torch.testing.assert_close(fast[~pad], slow[~pad], rtol=1e-4, atol=1e-4)
    path = tmp_path / "stack.sn"
    sparsenet.save(model, path)
    fresh = sparsenet.load(path, built(Stack))
    assert isinstance(fresh.encoder.layers[1].self_attn, HeadPrunedMultiheadAttention)
    assert attention_heads(fresh) == heads
    torch.testing.assert_close(fresh(x, pad), slow, rtol=0, atol=0)
    torch.export.export(fresh, (x, pad), strict=False)


def test_multihead_attention_it_cannot_rebuild_keeps_its_heads_and_says_why():
    class BiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 2)

        def forward(self, x):
            return self.down(self.up(self.attn(x, x, x, need_weights=False)[0]).relu())

    model = built(BiasKV)
    report = sparsenet.shrink(model, torch.randn(2, 5, 16), 0.5)
    assert model.attn.in_proj_weight.shape[0] == 48 and type(model.attn) is nn.MultiheadAttention
    assert model.up.out_features < 32  # the rest of the model still shrinks
    assert any("add_bias_kv" in r.reason for r in report.rows), str(report)


def test_attention_head_counts_follow_the_projections(tmp_path):
    model = built(bert)
    sparsenet.shrink(model, tokens(False), 0.5)
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads == attention.query.out_features // attention.attention_head_size < 4
    assert attention.all_head_size == attention.query.out_features
    path = tmp_path / "bert.safetensors"
    sparsenet.save(model, path)
    loaded = sparsenet.load(path, built(bert)).bert.encoder.layer[0].attention.self  # the plain model
    assert (loaded.num_attention_heads, loaded.all_head_size) == (attention.num_attention_heads, attention.all_head_size)


def test_fused_qkv_heads_are_removed_across_query_key_and_value():
    # GPT-2's c_attn computes q, k and v in one Conv1D, split in three: head h of each is one unit.
    model = built(gpt2)
    x = tokens(True)
    with torch.no_grad():
        reference = model(**x).logits
    report = sparsenet.shrink(model, x, 0.5)
    for block in model.transformer.h:
        attn = block.attn
        width = attn.num_heads * attn.head_dim
        assert attn.num_heads < 4 and attn.split_size == width
        assert attn.c_attn.weight.shape[1] == 3 * width and attn.c_proj.weight.shape[0] == width
    assert torch.isfinite(model(**x).logits).all() and reference.shape == model(**x).logits.shape
    assert not any("view" in r.reason for r in report.rows)  # the heads are no longer refused


def test_a_module_with_a_stale_size_is_restored_with_a_clear_error(untouched):
    class Stale(nn.Module):
        """Splits its projection at a width it keeps in an attribute sparsenet does not know."""

        def __init__(self):
            super().__init__()
            self.proj, self.out, self.width = nn.Linear(8, 16), nn.Linear(8, 2), 8

        def forward(self, x):
            a, b = self.proj(x).split(self.width, dim=-1)
            return self.out(a * b)

    model = Stale().eval()
    check = untouched(model)
    with pytest.raises(RuntimeError, match="no longer runs with its channels removed"):
        sparsenet.shrink(model, torch.randn(3, 8), 0.5)
    check()


def test_block_fits_after_the_refit_never_leave_a_block_worse():
    model = built(bert)
    g = torch.Generator().manual_seed(4)
    calib = [{"input_ids": torch.randint(3, 96, (4, 7), generator=g)} for _ in range(5)]
    # The residual stream is left as it is (exclude its producers), so each layer's output keeps its
    # width and can be fit to the original's.
    report = sparsenet.shrink(model, calib[0], 0.5, calib=calib, blockwise=True, epochs=3, lr=1e-3,
                              exclude=["bert.embeddings.word_embeddings"])
    names = [name for name, _ in report.blocks]
    assert names == ["bert.encoder.layer.0", "bert.encoder.layer.1"]  # the transformer layers, in order
    assert all(fit.after <= fit.before for _, fit in report.blocks)
    assert "block bert.encoder.layer.0" in str(report)
    with pytest.raises(ValueError, match="pass calib"):
        sparsenet.shrink(built(bert), calib[0], 0.5, blockwise=True)


def test_config_follows_widths_that_it_can_describe():
    from transformers import LlamaForCausalLM

    model, x = built(llama), tokens(True)
    original = model.config
    report = sparsenet.shrink(model, x, 0.5, scope="layer")  # every layer alike: one config fits them all
    attn = model.model.layers[0].self_attn
    assert report.config == {"hidden_size": (32, model.model.embed_tokens.embedding_dim),
                             "intermediate_size": (64, model.model.layers[0].mlp.up_proj.out_features),
                             "num_attention_heads": (4, attn.q_proj.out_features // attn.head_dim),
                             "num_key_value_heads": (2, attn.k_proj.out_features // attn.head_dim)}, str(report)
    assert "config.num_attention_heads: 4 ->" in str(report)
    assert original.num_attention_heads == 4  # a new config object: the caller's is left alone
    assert all(m.config is model.config for m in model.modules() if "config" in vars(m))
    rebuilt = LlamaForCausalLM(model.config).eval()  # the config alone builds the shrunk model
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(**x).logits, model(**x).logits)


def test_config_fields_it_cannot_describe_are_left_with_the_reason(tmp_path):
    # BERT's head size is hidden_size / num_attention_heads: fewer heads of the same size cannot
    # be written in its config, a narrower FFN can.
    model = built(bert)
    report = sparsenet.shrink(model, tokens(False), 0.5, scope="layer", exclude=["bert.embeddings.word_embeddings"])
    width = model.bert.encoder.layer[0].intermediate.dense.out_features
    assert report.config == {"intermediate_size": (64, width)}
    assert model.config.num_attention_heads == 4
    assert any(n.startswith("config.num_attention_heads left at 4") for n in report.config_notes)
    path = tmp_path / "bert.sn"
    sparsenet.save(model, path)
    fresh = sparsenet.load(path, built(bert))  # the plain model's config follows on load too
    assert fresh.config.intermediate_size == width and fresh.config.num_attention_heads == 4

    model = built(bert)
    report = sparsenet.shrink(model, tokens(False), 0.5)  # global: the layers differ
    assert report.config == {} and model.config.intermediate_size == 64
    assert any("the layers now differ" in n for n in report.config_notes)
