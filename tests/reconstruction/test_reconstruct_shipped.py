"""Models as shipped: GPT-2's Conv1D layers, heads tied to embeddings (GPT-2, T5), a CNN stem that
2:4 cannot tile, and the result after ``finalize``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsenet
from sparsenet.reconstruction import reconstruct

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from layer_twins import as_conv1d  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def batches(n=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 16, generator=g) for _ in range(n)]


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_batches(n, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (3, 12), generator=g)} for _ in range(n)]


def logit_error(model, dense, held):
    """Mean 1 - cosine similarity of the logits, over the held-out batches' tokens."""
    with torch.no_grad():
        return sum(float((1 - F.cosine_similarity(model(**b).logits, dense(**b).logits, dim=-1)).mean())
                   for b in held) / len(held)


TIED = {"lm_head": "weight tied to transformer.wte (an embedding)"}


@pytest.mark.parametrize("method, kwargs", [
    ("sparsegpt", {"sparsity": 0.5}),
    ("admm", {"structure": "2:4"}),
    ("lsq", {"structure": "channel", "sparsity": 0.5}),
    ("admm", {"structure": "block", "block": (4, 4), "sparsity": 0.5}),
])
def test_conv1d_is_solved_as_the_linear_it_is(method, kwargs):
    net = linear_net()
    twin = as_conv1d(net)
    results = [reconstruct(m, batches(), method=method, progress=False, **kwargs) for m in (net, twin)]
    for name, mask in results[0].masks.items():
        assert torch.equal(results[1].masks[name], mask.T), name
    for i in (0, 2, 4):
        torch.testing.assert_close(twin[i].weight.detach(), net[i].weight.detach().T, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(twin[i].bias.detach(), net[i].bias.detach(), atol=1e-5, rtol=1e-4)


def test_gpt2_reconstructs_as_shipped_and_beats_magnitude():
    dense = tiny_gpt2()
    calib, held = token_batches(6), token_batches(3, seed=9)
    model, magnitude = copy.deepcopy(dense), copy.deepcopy(dense)
    result = reconstruct(model, calib, 0.5, progress=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert [r.name for r in result.layers] == convs and len(convs) == 8
    assert result.skipped == TIED
    assert "lm_head: weight tied to transformer.wte (an embedding); left dense" in str(result)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, dense.transformer.wte.weight)
    sparsenet.prune(magnitude, 0.5)
    assert logit_error(model, dense, held) < 0.5 * logit_error(magnitude, dense, held)


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "lsq"])
def test_gpt2_nm_runs_along_the_conv1d_inputs(method):
    model = tiny_gpt2()
    result = reconstruct(model, token_batches(4), structure="2:4", method=method, blockwise=False,
                         progress=False)
    for name, mask in result.masks.items():
        assert (mask.T.reshape(-1, 4).sum(1) == 2).all(), name


def test_gpt2_channels_are_conv1d_columns():
    model = tiny_gpt2()
    result = reconstruct(model, token_batches(4), 0.25, structure="channel", method="lsq",
                         blockwise=False, progress=False)
    for name, mask in result.masks.items():
        assert (mask.all(0) | ~mask.any(0)).all(), name
        gone = ~mask.any(0)
        assert int(gone.sum()) == round(0.25 * mask.shape[1])
        assert (model.get_submodule(name).weight[:, gone] == 0).all()


def test_t5_reconstructs_as_shipped():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(4):
        ids = torch.randint(1, 50, (2, 8), generator=g)
        calib.append({"input_ids": ids, "decoder_input_ids": ids})
    pruned = sparsenet.prune(copy.deepcopy(model), 0.5, progress=False)
    result = reconstruct(model, calib, 0.5, progress=False)
    reason = "weight tied to shared, encoder.embed_tokens, decoder.embed_tokens (embeddings)"
    assert result.skipped == pruned.skipped == {"lm_head": reason}
    assert len(result.layers) == len(pruned.masks) == 32
    assert result.sparsity == pytest.approx(0.5)
    with torch.no_grad():
        assert torch.isfinite(model(**calib[0]).logits).all()


class StemNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 7, padding=3)  # 147 inputs per filter: no multiple of 4
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).mean(dim=(2, 3)))


def test_a_stem_that_2_4_cannot_tile_is_left_dense(untouched):
    model = StemNet()
    xs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = reconstruct(model, xs, structure="2:4", progress=False)
    reason = "2:4 needs its row length (147) to be a multiple of 4"
    assert result.skipped == {"stem": reason}
    assert list(result.masks) == ["conv", "fc"] and not parametrize.is_parametrized(model.stem)
    assert f"stem: {reason}; left dense" in str(result)
    lone = StemNet()
    check = untouched(lone)
    with pytest.raises(ValueError, match=r"'2:4' fits no layer: stem: 2:4 needs its row length \(147\)"):
        reconstruct(lone, xs, structure="2:4", exclude=["conv", "fc"], progress=False)
    check()


def test_masks_and_sparsity_still_answer_after_finalize():
    model = linear_net()
    result = reconstruct(model, batches(), 0.6, blockwise=False, progress=False)
    masks = {n: m.clone() for n, m in result.masks.items()}
    sparsity = result.sparsity
    text = str(result)
    assert result.finalize() is model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert result.sparsity == sparsity == pytest.approx(0.6, abs=0.02)
    assert result.masks.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(result.masks[name], mask)
        assert torch.equal(model.get_submodule(name).weight != 0, mask)
    assert str(result) == text
