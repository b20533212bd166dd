"""Real model architectures as shipped, end to end: prune (magnitude and Wanda), reconstruct,
sparsify, forward against the pruned dense model, save, load into a freshly built plain model,
torch.export, and (causal LMs) generation.

Tiny configs with random weights (nothing downloads), so each architecture takes seconds. Each
spec states how many layers sparsify must convert: every pruned Linear / Conv1D except tied heads
and layers the report names with a reason.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import sparsenet
from sparsenet._weights import is_linear
from sparsenet.nn import SparseLinear

VOCAB, SEQ, BATCH = 96, 8, 4


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict]  # keyword arguments of one forward
    converted: int  # layers sparsify converts
    causal: bool = False

    def output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(**batch)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tokens(g):
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=g),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def causal_tokens(g):
    # No key/value cache: the forward returns plain tensors, which torch.export can trace.
    return {**tokens(g), "use_cache": False}


def seq2seq_tokens(g):
    return {**causal_tokens(g), "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)}


def images(g, size=16):
    return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g)}


def embeddings(g, width=32):
    return {"x": torch.randn(BATCH, SEQ, width, generator=g)}


# ---- model builders (small configs, random weights) ----------------------------------------------

HF_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32, **HF_COMMON))


def distilbert():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    return DistilBertForMaskedLM(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                  max_position_embeddings=32, **HF_COMMON))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, **HF_COMMON))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,  # GQA
                                        max_position_embeddings=32, **HF_COMMON))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64, num_labels=5))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                               decoder_start_token_id=0, **HF_COMMON))


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                   max_position_embeddings=32, decoder_start_token_id=2,
                                                   **HF_COMMON))


def _resnet_module():
    """The ResNet-18 of benchmarks/shrink_resnet.py (one definition for the benchmark and the tests)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "shrink_resnet.py"
    spec = importlib.util.spec_from_file_location("_sparsenet_bench_resnet", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # it imports its sibling scripts
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def ResNet18():  # noqa: N802 (a model class in the other tests' eyes)
    """ResNet-18's layout (stem, four stages of two basic blocks, pooled linear head), narrow."""
    return _resnet_module().ResNet18(width=8, classes=10)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2's layout (inverted residuals with depthwise convolutions), narrow."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 2, 1), InvertedResidual(8, 16, 4, 2),
                                    InvertedResidual(16, 16, 4, 1))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU6(), nn.Linear(32, classes))

    def forward(self, pixel_values):
        return self.head(self.blocks(self.stem(pixel_values)).mean(dim=(2, 3)))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention between two Linear layers."""

    def __init__(self, width=32):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


class EncoderNet(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 64, batch_first=True), 2,
                                             enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)


ARCHS = [
    # BERT: 2 layers x (q, k, v, attention out, intermediate, output) + the MLM transform; the MLM
    # decoder is tied to the word embeddings.
    Arch("bert", bert, tokens, converted=13),
    Arch("distilbert", distilbert, tokens, converted=13),  # 2 x 6 + vocab_transform; projector tied
    Arch("gpt2", gpt2, causal_tokens, converted=8, causal=True),  # 2 x (c_attn, c_proj, c_fc, c_proj): Conv1D
    Arch("llama", llama, causal_tokens, converted=15, causal=True),  # 2 x (q, k, v, o, gate, up, down) + lm_head
    Arch("vit", vit, images, converted=13),  # 2 x 6 + classifier; the patch embedding is a Conv2d
    # T5: encoder (q, k, v, o, wi, wo), decoder (self q, k, v, o, cross q, k, v, o, wi, wo); lm_head
    # is tied to the shared embedding.
    Arch("t5", t5, seq2seq_tokens, converted=16),
    Arch("bart", bart, seq2seq_tokens, converted=16),
    Arch("resnet18", ResNet18, images, converted=1),  # only the head is Linear
    Arch("mobilenetv2", MobileNetV2, images, converted=2),
    Arch("multihead_attention", AttentionNet, embeddings, converted=2),  # MHA's own projections stay
    Arch("transformer_encoder", EncoderNet, embeddings, converted=4),  # linear1, linear2 per layer
]


def built(arch: Arch) -> nn.Module:
    torch.manual_seed(0)
    return arch.build().eval()


def calibration(arch: Arch, batches: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [arch.batch(g) for _ in range(batches)]


def linear_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_linear(m)]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_whole_flow(arch, tmp_path):
    model = built(arch)
    calib = calibration(arch)
    for criterion in ("magnitude", "wanda"):
        trial = copy.deepcopy(model)
        pruner = sparsenet.prune(trial, 0.5, criterion=criterion, calib=calib, progress=False)
        assert pruner.masks, criterion
        for name, mask in pruner.masks.items():  # layer scope: half of every pruned layer
            assert abs(1 - mask.float().mean().item() - 0.5) < 0.01, (criterion, name)
        pruner.finalize()

    result = sparsenet.reconstruct(model, calib, 0.5, epochs=1, progress=False)
    model = result.finalize()
    batch = arch.batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = arch.output(model, batch)
        sparse, report = sparsenet.sparsify(model)
        got = arch.output(sparse, batch)
    assert len(report.converted) == arch.converted, str(report)
    for row in report.rows:  # every Linear / Conv1D left dense says why
        assert row.format != "dense" or row.note, row
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max().clamp_min(1.0)

    path = tmp_path / f"{arch.name}.safetensors"
    sparsenet.save(sparse, path)
    loaded = sparsenet.load(path, built(arch))  # a plain model, built as the user builds it
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == arch.converted
    with torch.no_grad():
        assert torch.equal(arch.output(loaded.eval(), batch), got)

    exported = torch.export.export(sparse, (), kwargs=batch)
    ops = [n for n in exported.graph.nodes if n.op == "call_function" and "csr_linear" in str(n.target)]
    assert len(ops) == arch.converted


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.causal], ids=lambda a: a.name)
def test_generation_steps_agree(arch):
    model = built(arch)
    sparsenet.prune(model, 0.5, progress=False).finalize()
    sparse, _ = sparsenet.sparsify(model)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    runs = [m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            for m in (model, sparse)]
    for step, (a, b) in enumerate(zip(runs[0].logits, runs[1].logits)):
        assert (a - b).abs().max() < 1e-4, step
        top2 = a.topk(2).values
        if not torch.equal(a.argmax(-1), b.argmax(-1)):  # a flip is allowed only on a near-tie
            assert (top2[:, 0] - top2[:, 1]).min() < 2e-4
            break
