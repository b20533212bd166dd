"""The "activation" criterion: mean |output| per channel/neuron, against hand-computed values."""

import pytest
import torch
from torch import nn

from sparsenet.calibration import capture_output_abs_means
from sparsenet.pruning import Layer, ScoreContext, get_criterion, prune


@pytest.fixture
def two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return [torch.randn(5, 6) for _ in range(3)]


def expected_means(model, calib):
    x = torch.cat(calib)
    y0 = model[0](x)
    y2 = model[2](torch.relu(y0))
    return {"0": y0.abs().mean(0).detach(), "2": y2.abs().mean(0).detach()}


def test_scores_equal_hand_computed_and_broadcast(two_layer, calib):
    layers = {"0": two_layer[0], "2": two_layer[2]}
    ctx = ScoreContext(model=two_layer, layers=layers, calib=calib)
    crit = get_criterion("activation")
    crit.prepare(ctx)
    expected = expected_means(two_layer, calib)
    for n, m in layers.items():
        scores = crit(Layer(n, m, m.weight.detach(), None), ctx)
        assert scores.shape == m.weight.shape
        torch.testing.assert_close(scores, expected[n].unsqueeze(1).expand_as(scores))


def test_channel_prune_removes_lowest_activation_channels(two_layer, calib):
    expected = expected_means(two_layer, calib)
    pruner = prune(
        two_layer, 0.5, criterion="activation", structure="channel", calib=calib, progress=False
    )
    for n, means in expected.items():
        rows_kept = pruner.masks[n].all(dim=1)
        assert torch.equal(pruner.masks[n].any(dim=1), rows_kept)  # whole rows
        lowest = torch.sort(means, stable=True).indices[: means.numel() // 2]
        want = torch.ones_like(rows_kept)
        want[lowest] = False
        assert torch.equal(rows_kept, want)


def test_padding_tokens_excluded():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, attention_mask=None):
            return self.lin(x)

    model = Tok()
    x = torch.randn(2, 5, 4)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    got = capture_output_abs_means(model, {"lin": lin}, [{"x": x, "attention_mask": am}])
    ref = lin(x[am.bool()]).abs().mean(0).detach()
    torch.testing.assert_close(got["lin"], ref)
    # Poisoning the padded positions changes nothing.
    x2 = x.clone()
    x2[am == 0] = 1e6
    got2 = capture_output_abs_means(model, {"lin": lin}, [{"x": x2, "attention_mask": am}])
    torch.testing.assert_close(got2["lin"], ref)


def test_conv_means_over_batch_and_pixels(convnet):
    calib = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    conv = convnet.features[0]
    got = capture_output_abs_means(convnet, {"features.0": conv}, calib)
    ref = torch.cat([conv(x) for x in calib]).abs().mean(dim=(0, 2, 3)).detach()
    torch.testing.assert_close(got["features.0"], ref)
    pruner = prune(
        convnet, 0.5, criterion="activation", structure="channel", calib=calib,
        exclude=["classifier", "head"], progress=False,
    )
    keep = pruner.masks["features.0"].reshape(8, -1).all(dim=1)
    want = torch.ones(8, dtype=torch.bool)
    want[torch.sort(ref, stable=True).indices[:4]] = False
    assert torch.equal(keep, want)


def test_needs_calib(two_layer, untouched):
    check = untouched(two_layer)
    with pytest.raises(ValueError, match="'activation' needs calibration data"):
        prune(two_layer, 0.5, criterion="activation", structure="channel", progress=False)
    check()
