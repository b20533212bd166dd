"""Hugging Face's Conv1D (GPT-2's Linear, stored transposed) is pruned as the Linear it is."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsenet.pruning import CubicSchedule, LinearSchedule, prune

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from layer_twins import as_conv1d  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_net():
    torch.manual_seed(0)
    # Matrices 12x16, 8x12, 4x8: all grouped by 4 and tiled by 4x4 blocks.
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 16, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(2)]


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def conv1d_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def assert_transposed_masks(linear, conv):
    assert list(conv.masks) == list(linear.masks)
    for name, mask in linear.masks.items():
        assert torch.equal(conv.masks[name], mask.T), name


def test_the_twin_computes_the_same_function():
    net = linear_net()
    x = calib()[0][0]
    torch.testing.assert_close(as_conv1d(net)(x), net(x))


STRUCTURES = {
    "unstructured": {"sparsity": 0.5},
    "2:4": {"structure": "2:4"},
    "block": {"structure": "block", "block": (4, 4), "sparsity": 0.5},
    "channel": {"structure": "channel", "sparsity": 0.5},
}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("criterion", ["magnitude", "random", "wanda", "taylor", "activation"])
def test_conv1d_gets_the_masks_of_the_linear_it_is(criterion, structure, scope):
    net = linear_net()
    twin = as_conv1d(net)
    kwargs = dict(criterion=criterion, scope=scope, seed=0, calib=calib(), progress=False,
                  **STRUCTURES[structure])
    assert_transposed_masks(prune(net, **kwargs), prune(twin, **kwargs))


@pytest.mark.parametrize("kwargs", [
    {"allocation": "owl"},
    {"allocation": "search", "criterion": "wanda"},
    {"scope": "global", "min_sparsity": 0.2, "max_sparsity": 0.8},
    {"overrides": {"2": 0.3}},
], ids=["owl", "search", "bounds", "overrides"])
def test_allocations_treat_conv1d_as_its_linear(kwargs):
    net = linear_net()
    twin = as_conv1d(net)
    kwargs = dict(sparsity=0.6, calib=calib(), progress=False, **kwargs)
    assert_transposed_masks(prune(net, **kwargs), prune(twin, **kwargs))


@pytest.mark.parametrize("soft", [False, True])
def test_schedules_treat_conv1d_as_its_linear(soft):
    net = linear_net()
    twin = as_conv1d(net)
    schedule = (LinearSchedule if soft else CubicSchedule)(start=0, end=4, frequency=2, soft=soft)
    pruners = [prune(m, 0.75, criterion="wanda", calib=calib(), schedule=schedule, progress=False)
               for m in (net, twin)]
    for _ in range(4):
        for p in pruners:
            p.step()
        assert_transposed_masks(*pruners)
    for i in (0, 2, 4):  # the soft schedule's shrunk weights too
        torch.testing.assert_close(twin[i].parametrizations.weight.original,
                                   net[i].parametrizations.weight.original.T)


def test_repruning_a_masked_conv1d_keeps_its_old_zeros():
    net = linear_net()
    twin = as_conv1d(net)
    for m in (net, twin):
        prune(m, 0.3, criterion="random", seed=1, progress=False)
    assert_transposed_masks(*(prune(m, 0.6, structure="channel", progress=False) for m in (net, twin)))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_gpt2_prunes_every_conv1d_as_shipped(criterion):
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    embedding = model.transformer.wte.weight.detach().clone()
    pruner = prune(model, 0.5, criterion=criterion, calib=[ids], progress=False)

    convs = conv1d_names(model)
    assert len(convs) == 8 and {n.rsplit(".", 2)[-2] for n in convs} == {"attn", "mlp"}
    assert list(pruner.masks) == convs
    for name, mask in pruner.masks.items():
        assert mask.shape == model.get_submodule(name).parametrizations.weight.original.shape
        assert 1 - mask.float().mean() == pytest.approx(0.5, abs=1e-3), name
    assert pruner.skipped == {"lm_head": "weight tied to transformer.wte (an embedding)"}
    report = pruner.report(ids)
    assert all(r["type"] == "Conv1D" and r["positions"] == 8 for r in report)
    assert "lm_head: weight tied to transformer.wte (an embedding); left dense" in str(report)

    pruner.finalize()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # Conv1D's own layout
    for name in convs:
        layer = model.get_submodule(name)
        assert type(layer) is Conv1D and not parametrize.is_parametrized(layer)
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert torch.isfinite(model(ids).logits).all()


def test_nm_on_conv1d_runs_along_its_inputs():
    model = tiny_gpt2()
    pruner = prune(model, structure="2:4", progress=False)
    for name, mask in pruner.masks.items():
        # weight.T is the Linear's (out, in): every 4 consecutive inputs of an output keep 2.
        assert (mask.T.reshape(-1, 4).sum(1) == 2).all(), name


def test_channel_on_conv1d_removes_whole_output_units():
    model = tiny_gpt2()
    pruner = prune(model, 0.25, structure="channel", progress=False)
    for name, mask in pruner.masks.items():
        columns = mask.all(0) | ~mask.any(0)  # Conv1D's outputs are the columns of its weight
        assert columns.all(), name
        assert int((~mask.any(0)).sum()) == round(0.25 * mask.shape[1]), name
