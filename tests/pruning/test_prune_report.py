"""The pruning report: parameters and FLOPs before/after, measured output positions, dicts and table."""

import json

import pytest
import torch
from torch import nn

from sparsenet.pruning import PruningReport, prune
from sparsenet.pruning.flops import output_positions


def test_params_and_flops_per_position_without_data(convnet):
    pruner = prune(convnet, 0.5, progress=False)
    for row, (name, layer) in zip(pruner.report(), pruner.layers.items()):
        kept = row["numel"] - row["pruned"]
        assert row["params_before"] == row["numel"] + layer.bias.numel()
        assert row["params_after"] == kept + layer.bias.numel()  # the bias is never pruned
        assert row["positions"] is None and row["flops_per"] == "position"
        assert row["flops_before"] == 2 * row["numel"] and row["flops_after"] == 2 * kept


def test_output_positions_conv_with_stride_and_sequence_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3)  # 9x9 -> 5x5
            self.proj = nn.Linear(6, 4)

        def forward(self, x):
            y = self.conv(x).flatten(2).transpose(1, 2)  # (N, 25 tokens, 6)
            return self.proj(y)

    torch.manual_seed(0)
    net = Net()
    layers = {"conv": net.conv, "proj": net.proj}
    pos = output_positions(net, layers, torch.randn(3, 3, 9, 9))
    assert pos == {"conv": 25, "proj": 25}
    pruner = prune(net, 0.5, progress=False)
    report = pruner.report().with_positions(pos)
    conv = report[0]
    # Grouped conv: the weight (6 x 1 x 3 x 3) already counts only the inputs each filter reads.
    assert conv["flops_before"] == 2 * 6 * 1 * 3 * 3 * 25
    assert conv["flops_after"] == 2 * (54 - conv["pruned"]) * 25
    assert report.total["flops_per"] == "sample"
    assert report.total["flops_before"] == conv["flops_before"] + 2 * 24 * 25


def test_positions_follow_the_calibration_protocol(mlp):
    layers = {"0": mlp[0], "4": mlp[4]}
    x = torch.randn(5, 12)
    assert output_positions(mlp, layers, (x, torch.zeros(5))) == {"0": 1, "4": 1}
    assert output_positions(mlp, layers, x.view(5, 1, 12).expand(5, 3, 12)) == {"0": 3, "4": 3}
    # A layer the forward never reaches computes nothing.
    assert output_positions(mlp, {"0": mlp[0], "x": nn.Linear(2, 2)}, x) == {"0": 1, "x": 0}
    mlp.train()
    output_positions(mlp, layers, x)
    assert mlp.training and all(not m._forward_hooks for m in mlp.modules())


def test_mixed_units_have_no_flop_total(convnet):
    report = prune(convnet, 0.5, progress=False).report().with_positions({"features.0": 36})
    assert [r["flops_per"] for r in report][:2] == ["sample", "position"]
    assert report.total["flops_before"] is None and report.total["params_before"] > 0
    text = str(report)
    assert "mixed units" in text and "/pos" in text


def test_dicts_table_and_backward_compatible_fields(convnet):
    report = prune(convnet, 0.75, scope="global", progress=False).report()
    assert isinstance(report, list) and report.rows == list(report)
    dicts = report.to_dicts()
    dicts[0]["name"] = "changed"
    assert report[0]["name"] == "features.0"
    json.dumps(dicts)
    assert {"name", "type", "shape", "numel", "pruned", "sparsity"} <= report[0].keys()
    assert report.total["sparsity"] == pytest.approx(0.75, abs=1e-3) == report.total_sparsity
    text = str(report)
    for word in ("params", "FLOPs", "per output position", "total", "classifier"):
        assert word in text


def test_empty_report_renders():
    report = PruningReport.from_masks({}, {})
    assert report.total["flops_before"] is None and report.total_sparsity == 0.0
    assert "sparsenet pruning" in str(report)
