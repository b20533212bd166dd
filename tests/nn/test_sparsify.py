"""sparsify / densify on whole models: which layers swap, the report, and unchanged outputs."""
import pytest
import torch
from torch import nn

import sparsenet
from sparsenet.nn import SparseLinear

from layer_twins import zero_linear_weights


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def test_swaps_sparse_layers_and_keeps_outputs():
    model = zero_linear_weights(mlp(), 0.8)
    x = torch.randn(7, 20)
    sparse, report = sparsenet.sparsify(model, min_sparsity=0.5)
    assert sparse is not model and all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
    assert [type(m).__name__ for m in sparse] == ["SparseLinear", "ReLU", "SparseLinear", "ReLU", "SparseLinear"]
    assert torch.allclose(sparse(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(report.converted) == 3 and report.bytes_after < report.bytes_before
    rows = report.to_dicts()
    assert {"name", "shape", "sparsity", "format", "bytes_before", "bytes_after"} <= set(rows[0])
    assert all(0.7 < r["sparsity"] < 0.9 for r in rows)
    text = str(report)
    assert "csr" in text and "0" in text and "3 of 3" in text


def test_min_sparsity_threshold_and_inplace():
    model = mlp()
    zero_linear_weights(model[0], 0.9)
    same, report = sparsenet.sparsify(model, min_sparsity=0.5, inplace=True)
    assert same is model
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    assert [r.note for r in report.skipped] == ["below min_sparsity", "below min_sparsity"]


def test_accepts_sparsenet_and_torch_pruned_layers_without_removing_masks():
    model = mlp()
    sparsenet.prune(model, 0.75, progress=False)  # parametrized, not finalized
    x = torch.randn(3, 20)
    expected = model(x)
    sparse, report = sparsenet.sparsify(model)
    assert len(report.converted) == 3
    assert torch.allclose(sparse(x), expected, rtol=1e-5, atol=1e-6)

    model2 = mlp()
    for m in model2:
        if isinstance(m, nn.Linear):
            torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.6)
    expected2 = model2(x)
    sparse2, report2 = sparsenet.sparsify(model2, min_sparsity=0.5)
    assert len(report2.converted) == 3
    assert torch.allclose(sparse2(x), expected2, rtol=1e-5, atol=1e-6)


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)
        self.embed = nn.Embedding(10, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        h = self.embed(tokens)
        h, _ = self.attn(h, h, h)
        return self.head(self.proj(h))


def test_leaves_attention_projections_and_tied_weights_alone():
    model = WithAttention()
    with torch.no_grad():
        for p in model.parameters():
            p[torch.rand_like(p) < 0.8] = 0
    tokens = torch.randint(0, 10, (2, 5))
    sparse, report = sparsenet.sparsify(model, min_sparsity=0.5)
    notes = {r.name: r.note for r in report.rows}
    assert "nn.MultiheadAttention" in notes["attn.out_proj"]
    assert notes["head"].startswith("weight tied to")
    assert isinstance(sparse.proj, SparseLinear)
    assert type(sparse.attn.out_proj) is not SparseLinear and type(sparse.head) is nn.Linear
    assert torch.allclose(sparse(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_hugging_face_bert_from_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    sparsenet.prune(model, 0.8, exclude=["pooler"], progress=False).finalize()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    sparse, report = sparsenet.sparsify(model, min_sparsity=0.5)
    assert len(report.converted) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 12
    with torch.no_grad():
        got = sparse(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_densify_round_trip():
    model = zero_linear_weights(mlp(), 0.8)
    sparse, _ = sparsenet.sparsify(model)
    dense = sparsenet.densify(sparse)
    assert all(type(m) is nn.Linear for m in dense if not isinstance(m, nn.ReLU))
    for a, b in zip(dense.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert isinstance(sparse[0], SparseLinear)  # not in place by default
    single, _ = sparsenet.sparsify(zero_linear_weights(nn.Linear(8, 8), 0.9))
    assert isinstance(single, SparseLinear)
    assert type(sparsenet.densify(single)) is nn.Linear


def test_model_without_linear_layers_gives_empty_report():
    model = nn.Sequential(nn.LayerNorm(3), nn.ReLU())
    same, report = sparsenet.sparsify(model)
    assert len(report) == 0 and "no Linear, Conv1D or Conv2d layers" in str(report)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", None, float("nan")])
def test_bad_min_sparsity(bad):
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsenet.sparsify(mlp(), min_sparsity=bad)


def test_bad_model_type():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsenet.sparsify("model")
    with pytest.raises(TypeError, match="nn.Module"):
        sparsenet.densify(42)


def test_non_float32_layers_stay_dense_with_a_reason():
    model = zero_linear_weights(mlp(), 0.9)
    model[2].double()
    sparse, report = sparsenet.sparsify(model)
    notes = {r.name: r.note for r in report.rows}
    assert notes["2"] == "float64: the CPU kernels run float32 only"
    assert type(sparse[2]) is nn.Linear and isinstance(sparse[0], SparseLinear)


def test_inplace_failure_leaves_every_layer_as_it_was():
    model = zero_linear_weights(mlp(), 0.8)
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")  # the last layer fails after the first two converted
    layers = list(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '4' cannot be converted.*non-finite"):
        sparsenet.sparsify(model, inplace=True)
    assert list(model) == layers and all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0, equal_nan=True)


def test_inplace_any_conversion_error_swaps_nothing(monkeypatch):
    model = zero_linear_weights(mlp(), 0.8)
    layers, real = list(model), SparseLinear.from_dense.__func__

    def fail_on_last(cls, linear, mask=None, format="csr"):
        if linear is layers[4]:
            raise RuntimeError("out of memory")
        return real(cls, linear, mask, format)

    monkeypatch.setattr(SparseLinear, "from_dense", classmethod(fail_on_last))
    # (format="csr": with "auto" and no cached timing, the layer built to be timed is the one kept,
    # so from_dense would not be called and the test would depend on the tests run before it)
    with pytest.raises(RuntimeError, match="out of memory"):
        sparsenet.sparsify(model, inplace=True, format="csr")
    assert list(model) == layers


def test_linear_registered_twice_is_swapped_under_both_names():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = self.b = zero_linear_weights(nn.Linear(8, 8), 0.9)

        def forward(self, x):
            return self.b(self.a(x))

    model = Twice()
    x = torch.randn(3, 8)
    sparse, report = sparsenet.sparsify(model)
    assert isinstance(sparse.a, SparseLinear) and sparse.a is sparse.b
    assert [r.name for r in report.converted] == ["a"]
    assert torch.allclose(sparse(x), model(x), rtol=1e-5, atol=1e-6)


def test_weight_norm_layer_stays_dense_with_a_note():
    model = zero_linear_weights(mlp(), 0.6)  # sparse enough to convert; no all-zero row (weight_norm divides by its norm)
    torch.nn.utils.parametrizations.weight_norm(model[2])
    x = torch.randn(4, 20)
    sparse, report = sparsenet.sparsify(model)
    notes = {r.name: r.note for r in report.rows}
    assert "_WeightNorm, not sparsenet's mask" in notes["2"]
    assert [r.name for r in report.converted] == ["0", "4"]
    assert type(sparse[2]) is type(model[2]) and torch.nn.utils.parametrize.is_parametrized(sparse[2])
    assert torch.allclose(sparse(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer '2' has a parametrization on `weight`"):
        sparsenet.prune(model, 0.5, progress=False)


# ---- exclude=, Conv1D, Conv2d rows -------------------------------------------------------------------

def test_exclude_leaves_layers_dense_and_checks_its_patterns():
    model = zero_linear_weights(mlp(), 0.8)
    sparse, report = sparsenet.sparsify(model, exclude=["4"])
    assert [type(m).__name__ for m in sparse][::2] == ["SparseLinear", "SparseLinear", "Linear"]
    assert {r.name: r.note for r in report.rows}["4"] == "excluded"
    sparse, _ = sparsenet.sparsify(model, exclude="[02]")  # one glob, a string
    assert [type(m).__name__ for m in sparse][::2] == ["Linear", "Linear", "SparseLinear"]
    with pytest.raises(ValueError, match="match no module"):
        sparsenet.sparsify(model, exclude=["fc9"])
    with pytest.raises(TypeError, match="exclude"):
        sparsenet.sparsify(model, exclude=[3])


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_conv1d_layers_convert_as_the_linears_they_are():
    from sparsenet._weights import is_conv1d

    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if is_conv1d(m):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < 0.3)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    with torch.no_grad():
        expected = model(ids).logits
        sparse, report = sparsenet.sparsify(model)
        got = sparse(ids).logits
    assert (got - expected).abs().max() < 1e-5
    converted = {r.name for r in report.converted}
    assert converted == {f"transformer.h.{i}.{p}" for i in range(2)
                         for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    c_fc = sparse.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, SparseLinear) and (c_fc.out_features, c_fc.in_features) == (128, 32)
    rows = {r.name: r for r in report.rows}
    assert rows["transformer.h.0.mlp.c_fc"].shape == (128, 32)  # (out, in), like a Linear
    assert rows["lm_head"].format == "dense" and "tied to transformer.wte" in rows["lm_head"].note


def test_conv2d_layers_are_listed_with_the_reason_they_stay_dense():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    sparsenet.prune(model, 0.7).finalize()
    sparse, report = sparsenet.sparsify(model)
    rows = {r.name: r for r in report.rows}
    assert rows["0"].format == "dense" and "Conv2d" in rows["0"].note and rows["0"].shape == (8, 27)
    assert 0.69 < rows["0"].sparsity < 0.71
    assert rows["2"].format == "csr" and "1 of 2 layers converted" in str(report)


def test_layers_on_a_device_without_kernels_stay_dense_with_a_reason():
    model = zero_linear_weights(mlp(), 0.9)
    model[2].to("meta")
    sparse, report = sparsenet.sparsify(model, format="csr")
    notes = {r.name: r.note for r in report.rows}
    assert notes["2"] == "on meta: no kernel for it in this build"
    assert type(sparse[2]) is nn.Linear and isinstance(sparse[0], SparseLinear)
    assert "meta" in str(report)  # the report prints, an unknown sparsity included


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("format", ["csr", "bitmap"])
def test_sparsify_converts_cuda_layers_to_formats_with_cuda_kernels(format):
    model = zero_linear_weights(mlp(), 0.9).cuda().half()
    x = torch.randn(3, model[0].in_features, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        sparse, report = sparsenet.sparsify(model, format=format)
        got = sparse(x)
    assert isinstance(sparse[0], SparseLinear) and sparse[0].values.device.type == "cuda"
    assert sparse[0].values.dtype == torch.float16 and sparse[0].format == format
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_auto_times_cuda_layers_on_their_gpu(monkeypatch):
    from sparsenet.nn import autoformat

    timed = []

    def scripted(calls):  # bitmap fastest; and the candidates are the formats with CUDA kernels
        timed.append(sorted(calls))
        return {name: {"dense": 1.0, "bitmap": 0.5}.get(name, 0.9) for name in calls}

    monkeypatch.setattr(autoformat, "time_calls_cuda", scripted)
    model = zero_linear_weights(mlp(), 0.9).cuda().half()
    sparse, report = sparsenet.sparsify(model, rows=4)
    assert timed and all(t == ["bitmap", "csr", "dense"] for t in timed)
    assert isinstance(sparse[0], SparseLinear) and sparse[0].format == "bitmap"
    assert sparse[0].values.device.type == "cuda" and sparse[0].values.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_sparsify_converts_cuda_convolutions():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).cuda()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    x = torch.randn(2, 4, 10, 10, device="cuda")
    with torch.no_grad():
        expected = model(x)
        sparse, report = sparsenet.sparsify(model, format="csr")
        got = sparse(x)
    from sparsenet.nn import SparseConv2d

    assert isinstance(sparse[0], SparseConv2d) and sparse[0].values.device.type == "cuda"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
