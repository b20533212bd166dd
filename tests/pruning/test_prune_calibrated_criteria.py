"""Wanda and Taylor scores against hand-computed references; their calibration errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenet.pruning import Layer, ScoreContext, available_criteria, get_criterion, prune


@pytest.fixture
def two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(3)]


def scores_of(name, model, calib, loss_fn=None):
    """Run a criterion the way prune() does, without masking anything."""
    layers = {"0": model[0], "2": model[2]}
    ctx = ScoreContext(model=model, layers=layers, calib=calib, loss_fn=loss_fn)
    crit = get_criterion(name)
    crit.prepare(ctx)
    return {n: crit(Layer(n, m, m.weight.detach(), None), ctx) for n, m in layers.items()}


def lowest_half_removed(scores):
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(0.5 * flat.numel())]] = False
    return keep.view(scores.shape)


def test_registered():
    assert {"magnitude", "random", "taylor", "wanda"} <= set(available_criteria())


def test_wanda_equals_hand_computed(two_layer, calib):
    x = torch.cat([b[0] for b in calib])
    h = torch.relu(two_layer[0](x))
    expected = {
        "0": two_layer[0].weight.abs() * x.norm(dim=0),
        "2": two_layer[2].weight.abs() * h.norm(dim=0),
    }
    got = scores_of("wanda", two_layer, calib)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n].detach())
    pruner = prune(two_layer, 0.5, criterion="wanda", calib=calib, progress=False)
    for n in expected:
        assert torch.equal(pruner.masks[n], lowest_half_removed(expected[n].detach()))


def test_wanda_grouped_conv_reads_each_filters_own_input_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(2, 4, 5, 5)
    model = nn.Sequential(conv)
    ctx = ScoreContext(model=model, layers={"0": conv}, calib=[x])
    crit = get_criterion("wanda")
    crit.prepare(ctx)
    got = crit(Layer("0", conv, conv.weight.detach(), None), ctx)
    norms = x.pow(2).sum((0, 2, 3)).sqrt()  # per input channel
    for o in range(6):
        group = o // 3  # 3 filters per group, each reads 2 input channels
        want = conv.weight[o].detach().abs() * norms[2 * group: 2 * group + 2].view(2, 1, 1)
        torch.testing.assert_close(got[o], want)


def taylor_reference(model, batches, loss):
    ref = copy.deepcopy(model)
    total = {"0": 0, "2": 0}
    for batch in batches:
        ref.zero_grad()
        loss(ref, batch).backward()
        for n in total:
            total[n] = total[n] + (ref[int(n)].weight * ref[int(n)].weight.grad).abs().detach()
    return total


def test_taylor_equals_hand_computed_default_loss(two_layer, calib, untouched):
    expected = taylor_reference(two_layer, calib, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    two_layer[2].weight.requires_grad_(False)  # frozen layers are scored too, then refrozen
    check = untouched(two_layer)
    got = scores_of("taylor", two_layer, calib)
    check()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n])
    pruner = prune(two_layer, 0.5, criterion="taylor", calib=calib, scope="global", progress=False)
    flat = torch.cat([expected[n].reshape(-1) for n in ("0", "2")])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(0.5 * flat.numel())]] = False
    assert torch.equal(torch.cat([pruner.masks[n].reshape(-1) for n in ("0", "2")]), keep)


def test_taylor_custom_loss_gets_the_raw_batch(two_layer):
    class Kw(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features):
            return self.inner(features)

    torch.manual_seed(2)
    # (kwargs, targets): the model gets **kwargs, loss_fn the pair as given.
    batches = [({"features": torch.randn(4, 6)}, torch.rand(4, 3)) for _ in range(2)]
    seen = []

    def loss_fn(output, batch):
        seen.append(sorted(batch[0]))
        return (output * batch[1]).sum()

    model = Kw(two_layer)
    layers = {"0": two_layer[0], "2": two_layer[2]}
    ctx = ScoreContext(model=model, layers=layers, calib=batches, loss_fn=loss_fn)
    get_criterion("taylor").prepare(ctx)
    expected = taylor_reference(two_layer, batches, lambda m, b: (m(b[0]["features"]) * b[1]).sum())
    for n in expected:
        torch.testing.assert_close(ctx.stats["taylor"][n], expected[n])
    assert seen == [["features"], ["features"]]


def test_taylor_after_masking_scores_pruned_weights_zero(two_layer, calib):
    prune(two_layer, 0.5, progress=False)
    pruner = prune(two_layer, 0.7, criterion="taylor", calib=calib, progress=False)
    for n, m in pruner.masks.items():
        assert int((~m).sum()) == round(0.7 * m.numel())


@pytest.mark.parametrize("criterion", ["wanda", "taylor"])
def test_criterion_without_calib(two_layer, criterion, untouched):
    check = untouched(two_layer)
    with pytest.raises(ValueError, match=f"criterion '{criterion}' needs calibration data.*calib="):
        prune(two_layer, 0.5, criterion=criterion, progress=False)
    check()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"criterion": "wanda", "calib": []}, "calib is empty"),
        ({"criterion": "taylor", "calib": []}, "calib is empty"),
        ({"criterion": "taylor", "calib": [torch.randn(2, 6)]}, "needs targets"),
        (
            {"criterion": "taylor", "calib": [torch.randn(2, 6)],
             "loss_fn": lambda out, b: out.sum() * float("nan")},
            r"NaN or Inf gradient for layer '0' on calibration batch #0",
        ),
        (
            {"criterion": "taylor", "calib": [torch.randn(2, 6)], "loss_fn": lambda out, b: out},
            "loss_fn must return a scalar",
        ),
        ({"criterion": "wanda", "calib": [torch.randn(2, 5)]}, None),  # wrong width: torch's error
    ],
)
def test_calibration_errors_leave_model_untouched(two_layer, untouched, kwargs, match):
    check = untouched(two_layer)
    with pytest.raises((ValueError, RuntimeError), match=match):
        prune(two_layer, 0.5, progress=False, **kwargs)
    check()


class Tokens(nn.Module):
    """Token-wise, called like a Hugging Face model: model(x=[batch, seq, 6], attention_mask=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x, attention_mask):
        return self.lin(x)


@pytest.mark.parametrize("criterion", ["wanda", "activation"])
@pytest.mark.parametrize("batch", [
    torch.randn(0, 6),
    {"x": torch.randn(0, 3, 6), "attention_mask": torch.ones(0, 3)},
    {"x": torch.randn(2, 3, 6), "attention_mask": torch.zeros(2, 3)},  # every token padding
], ids=["no_rows", "dict_no_rows", "all_padding"])
def test_calibration_without_data_is_refused(criterion, batch, untouched):
    # All-zero statistics would rank every weight equal and prune by position (whole leading rows).
    torch.manual_seed(0)
    model = Tokens() if isinstance(batch, dict) else nn.Sequential(nn.Linear(6, 4))
    check = untouched(model)
    with pytest.raises(ValueError, match=r"no calibration data reached layer '(lin|0)'.*only padding"):
        prune(model, 0.5, criterion=criterion, structure="channel", calib=[batch], progress=False)
    check()
    # An empty batch among real ones is fine: the statistics come from the others.
    prune(model, 0.5, criterion=criterion, structure="channel", progress=False,
          calib=[batch, {"x": torch.randn(2, 3, 6), "attention_mask": torch.ones(2, 3)}
                 if isinstance(batch, dict) else torch.randn(2, 6)])
