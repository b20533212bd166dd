"""``sparsenet.reconstruct``: masks, stages, statistics, transactional errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsenet
from sparsenet.calibration.gram import capture_grams, conv_patches
from sparsenet.pruning import find_weight_mask
from sparsenet.reconstruction import reconstruct
from sparsenet.reconstruction.stages import find_stages, probe

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n=6, size=32, features=16, seed=1):
    """Correlated inputs; every seed draws from the same distribution (same mixing)."""
    mix = torch.randn(features, features, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, features, generator=g) @ mix for _ in range(n)]


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(ResBlock(8), ResBlock(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.layer1(F.relu(self.stem(x))).mean(dim=(2, 3)))


def tiny_bert(layers):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def rel_out_error(model, dense, xs):
    with torch.no_grad():
        num = sum(float((model(x) - dense(x)).pow(2).sum()) for x in xs)
        den = sum(float(dense(x).pow(2).sum()) for x in xs)
    return num / den


def test_gram_of_conv_patches_reproduces_the_convolution():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2)),
                 nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")):
        x = torch.randn(2, 3, 9, 10)
        rows = conv_patches(conv, x)
        y = conv(x)
        expect = y.permute(0, 2, 3, 1).reshape(-1, 4)
        got = rows @ conv.weight.reshape(4, -1).T + conv.bias
        assert torch.allclose(got, expect, atol=1e-5)


def test_gram_drops_padding_tokens():
    lin = nn.Linear(5, 3)
    model = nn.Sequential(lin)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, attention_mask):
            return self.inner(x)

    x = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    grams = capture_grams(Wrap(), {"inner.0": lin}, [{"x": x, "attention_mask": mask}])
    kept = x[mask.bool()]
    assert grams["inner.0"].rows == 5
    assert torch.allclose(grams["inner.0"].xtx, (kept.T @ kept).double(), atol=1e-5)


def test_reconstruct_prunes_and_beats_magnitude_on_an_mlp():
    dense, xs = mlp(), batches()
    model = copy.deepcopy(dense)
    result = reconstruct(model, xs, 0.7, progress=False)
    for name, mask in result.masks.items():
        assert 1 - float(mask.float().mean()) == pytest.approx(0.7, abs=0.01), name
    magnitude = copy.deepcopy(dense)
    sparsenet.prune(magnitude, 0.7)
    held = batches(3, seed=9)
    assert rel_out_error(model, dense, held) < 0.5 * rel_out_error(magnitude, dense, held)
    assert "reconstruction" in str(result) and len(result.layers) == 3
    result.finalize()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_keeps_given_masks_and_improves_weights():
    dense, xs = mlp(), batches()
    pruned = copy.deepcopy(dense)
    sparsenet.prune(pruned, 0.6, criterion="wanda", calib=xs)
    masks = {n: find_weight_mask(m).mask.clone() for n, m in pruned.named_modules() if find_weight_mask(m)}
    refit = copy.deepcopy(pruned)
    reconstruct(refit, xs, progress=False)
    for n, m in refit.named_modules():
        if n in masks:
            assert torch.equal(find_weight_mask(m).mask, masks[n])
    held = batches(3, seed=9)
    assert rel_out_error(refit, dense, held) < rel_out_error(pruned, dense, held)


def test_exclude_leaves_layers_untouched_even_through_block_fits():
    model = ResNetish()
    before = {k: v.clone() for k, v in model.fc.state_dict().items()}
    xs = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    reconstruct(model, xs, 0.5, exclude=["fc", "stem"], progress=False)
    assert find_weight_mask(model.fc) is None and find_weight_mask(model.stem) is None
    for k, v in model.fc.state_dict().items():
        assert torch.equal(v, before[k])
    assert find_weight_mask(model.layer1[0].conv1) is not None


def test_stages_detect_residual_blocks_and_chains():
    model = ResNetish()
    layers = sparsenet.pruning.find_prunable_layers(model)
    xs = [torch.randn(2, 3, 8, 8)]
    stages = probe(model, find_stages(model, layers), xs)
    assert [s.name for s in stages] == ["stem", "layer1.0", "layer1.1", "fc"]
    assert [s.chained for s in stages] == [False, False, True, False]
    assert stages[1].groups == [["layer1.0.conv1"], ["layer1.0.conv2"]]


def test_stages_detect_bert_layers_and_qkv_groups():
    model = tiny_bert(layers=3)
    ids = torch.randint(0, 50, (2, 7))
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    layers = sparsenet.pruning.find_prunable_layers(model)
    stages = probe(model, find_stages(model, layers), calib)
    assert [s.name for s in stages] == [f"encoder.layer.{i}" for i in range(3)] + ["pooler.dense"]
    assert [s.chained for s in stages] == [False, True, True, False]
    assert len(stages[0].groups[0]) == 3  # query, key, value read the same input


def test_bert_with_padding_reconstructs():
    model = tiny_bert(layers=2)
    dense = copy.deepcopy(model)
    calib = []
    for i in range(4):
        ids = torch.randint(0, 50, (3, 9))
        mask = torch.ones_like(ids)
        mask[0, 5 + i % 3:] = 0
        calib.append({"input_ids": ids, "attention_mask": mask})
    # The same batches with other tokens at the padded positions: the statistics drop those
    # positions, so the reconstruction must come out identical.
    repadded = []
    for batch in calib:
        ids, pad = batch["input_ids"].clone(), batch["attention_mask"] == 0
        ids[pad] = (ids[pad] + 7) % 50
        repadded.append({"input_ids": ids, "attention_mask": batch["attention_mask"]})
    twin = copy.deepcopy(model)
    result = reconstruct(model, calib, 0.5, progress=False)
    reconstruct(twin, repadded, 0.5, progress=False)
    assert len(result.layers) == 13
    assert all(p.grad is None for p in model.parameters())  # the block fits leave no gradients
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        out = model(**calib[0]).last_hidden_state
    assert torch.isfinite(out).all()
    assert not torch.equal(out, dense(**calib[0]).last_hidden_state)


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "lsq"])
def test_every_method_and_nm(method):
    dense, xs = mlp(), batches()
    model = copy.deepcopy(dense)
    reconstruct(model, xs, structure="2:4", method=method, blockwise=False, progress=False)
    for m in model.modules():
        if (mask := find_weight_mask(m)) is not None:
            assert bool((mask.mask.view(-1, 4).sum(1) == 2).all())
    plain = copy.deepcopy(dense)  # the same pattern by magnitude, weights not refitted
    sparsenet.prune(plain, structure="2:4", criterion="magnitude")
    held = batches(3, seed=9)
    assert rel_out_error(model, dense, held) < rel_out_error(plain, dense, held)


def test_channel_structure_refits_the_next_layer():
    dense, xs = mlp(), batches(8)
    model = copy.deepcopy(dense)
    reconstruct(model, xs, 0.5, structure="channel", method="lsq", blockwise=False, progress=False)
    w = model[0].weight
    rows_gone = (w == 0).all(dim=1)
    assert int(rows_gone.sum()) == 16
    plain = copy.deepcopy(dense)
    sparsenet.prune(plain, 0.5, structure="channel", criterion="wanda", calib=xs)
    held = batches(3, seed=9)
    assert rel_out_error(model, dense, held) < rel_out_error(plain, dense, held)


def test_owl_allocation_keeps_the_total():
    model, xs = mlp(), batches()
    with torch.no_grad():
        model[2].weight[:, :3] *= 30.0  # outlier columns: OWL must prune this layer less
    result = reconstruct(model, xs, 0.6, allocation="owl", blockwise=False, progress=False)
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    levels = {layer.name: layer.sparsity for layer in result.layers}
    assert levels["2"] < min(levels["0"], levels["4"]) - 0.05


def test_final_pass_on_the_model_output():
    dense, xs = mlp(), batches(8)
    model = copy.deepcopy(dense)
    result = reconstruct(model, xs, 0.8, final="mse", progress=False)
    assert result.final is not None and result.final.after <= result.final.before
    assert "model output" in str(result)
    with pytest.raises(ValueError, match="final"):
        reconstruct(mlp(), xs, 0.5, final="l1")


def test_user_blocks_and_search_allocation():
    model, xs = mlp(), batches()
    layers = sparsenet.pruning.find_prunable_layers(model)
    stages = find_stages(model, layers, blocks=["0"])
    assert [s.name for s in stages] == ["0", "2", "4"]
    with pytest.raises(ValueError, match="not modules"):
        find_stages(model, layers, blocks=["nope"])
    result = reconstruct(model, xs, 0.6, allocation="search", blockwise=False, progress=False)
    assert result.sparsity == pytest.approx(0.6, abs=0.02)
    levels = [layer.sparsity for layer in result.layers]
    assert max(levels) - min(levels) > 0.1  # the search chose, rather than the uniform 0.6


def test_sparsity_zero_is_a_refit_with_full_masks():
    dense, xs = mlp(), batches()
    model = copy.deepcopy(dense)
    result = reconstruct(model, xs, 0.0, blockwise=False, progress=False)
    assert result.sparsity == 0.0
    assert rel_out_error(model, dense, xs) < 1e-6


@pytest.mark.parametrize(
    "calib, match",
    [
        ([torch.full((4, 16), float("nan"))], "NaN"),
        ([], "empty"),
        ([torch.randn(4, 15)], "does not run through the model"),
        ([torch.randn(0, 16)], "no calibration data reached layer '0'"),
    ],
)
def test_bad_calibration_raises_and_leaves_model_unchanged(calib, match, untouched):
    model = mlp()
    check = untouched(model)
    with pytest.raises(ValueError, match=match):
        reconstruct(model, calib, 0.5, progress=False)
    check()


def test_failure_part_way_rolls_back(untouched):
    model = ResNetish()
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom")

    model.fc.register_forward_pre_hook(explode)
    check = untouched(model)  # after the hook, which stays
    xs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with pytest.raises(RuntimeError, match="boom"):
        reconstruct(model, xs, 0.5, progress=False)
    assert calls["n"] > 3  # it failed after earlier stages were already rewritten
    check()


def test_argument_errors():
    model, xs = mlp(), batches(2)
    with pytest.raises(ValueError, match="sparsity="):
        reconstruct(model, xs)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        reconstruct(model, xs, 1.0)
    with pytest.raises(ValueError, match="unknown method"):
        reconstruct(model, xs, 0.5, method="obs2")
    with pytest.raises(ValueError, match="unknown allocation"):
        reconstruct(model, xs, 0.5, allocation="best")
    with pytest.raises(ValueError, match="channel"):
        reconstruct(model, xs, 0.5, structure="channel", method="sparsegpt")
    with pytest.raises(TypeError, match="re-iterable"):
        reconstruct(model, iter(xs), 0.5)
    with pytest.raises(ValueError, match="holdout"):
        reconstruct(model, xs, 0.5, holdout=1.5)
    with pytest.raises(ValueError, match="no prunable"):
        reconstruct(nn.Sequential(nn.ReLU()), xs, 0.5)
    sparsenet.prune(model, 0.5)
    with pytest.raises(ValueError, match="already masked"):
        reconstruct(model, xs, 0.5)


def test_decoder_with_kv_cache_reconstructs():
    # Llama-style decoder layers get a key/value cache object that each call appends to:
    # replayed stage calls must not attend to keys left by earlier replays.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 64, (3, 12), generator=g)} for _ in range(4)]
    held = torch.randint(0, 64, (3, 12), generator=g)
    layers = sparsenet.pruning.find_prunable_layers(model, ["lm_head"])
    stages = probe(model, find_stages(model, layers), calib)
    assert [s.chained for s in stages] == [False, True]
    assert [len(g) for g in stages[0].groups] == [3, 1, 2, 1]  # qkv, o, gate+up, down
    magnitude, rebuilt = copy.deepcopy(model), copy.deepcopy(model)
    sparsenet.prune(magnitude, 0.5, exclude=["lm_head"])
    reconstruct(rebuilt, calib, 0.5, exclude=["lm_head"], progress=False)
    with torch.no_grad():
        ref = model(held).logits
        err = {n: float((1 - F.cosine_similarity(m(held).logits, ref, dim=-1)).mean())
               for n, m in (("magnitude", magnitude), ("rebuilt", rebuilt))}
    assert err["rebuilt"] < 0.5 * err["magnitude"]
