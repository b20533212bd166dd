"""Shrink a ResNet-18-style network (random weights, 224x224) to half its multiply-adds and time it.

    python benchmarks/shrink_resnet.py [--rounds 10] [--calib 16] [--round-to 16]

torchvision has no CPU wheel for the torch used here, so the network is written out below: a
7x7 stem, four stages of two basic blocks (64, 128, 256, 512 channels, BatchNorm, residual adds,
1x1 downsample branches), average pooling and a Linear head. Prints the shrink report's totals, then
dense vs shrunk forward time at batch 1 and 8 in both memory layouts (contiguous, channels-last),
interleaved in one process, next to the share of multiply-adds left. Names the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

import sparsenet
from machine import cpu_name
from shrink_bert import timed


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout; ``width`` is the first stage's channels (64 in the original; the tests
    use a narrow one)."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, pixel_values):
        return self.fc(self.layers(self.stem(pixel_values)).mean(dim=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calib", type=int, default=16, help="calibration images (batches of 8)")
    parser.add_argument("--round-to", type=int, default=16, help="widths a multiple of this (oneDNN blocks "
                        "channels by 16 on AVX-512)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18().eval()
    with torch.no_grad():  # BatchNorm statistics of a trained-looking network, not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(max(1, args.calib // 8))]
    start = time.perf_counter()
    report = sparsenet.shrink(model, calib[0][:1], 0.5, target="flops", calib=calib, round_to=args.round_to,
                              progress=False)
    seconds = time.perf_counter() - start
    left = report.macs_after / report.macs_before
    print(f"{cpu_name()}, {args.threads} threads; multiply-adds {report.macs_before:,} -> {report.macs_after:,} "
          f"({left:.1%}); parameters {report.params_before:,} -> {report.params_after:,}; shrink took {seconds:.0f} s")
    results = {"cpu": cpu_name(), "seconds": seconds, "macs_left": left, "speedup": {}}
    # Both memory layouts: channels-last is what oneDNN prefers for CPU inference, and torch's
    # eager convolution sends a 3x3 conv with at most 20,480 input elements at batch 1 to its
    # slow reference kernel when the input is contiguous NCHW (narrowed 7x7 stages fall under it).
    for layout in (torch.contiguous_format, torch.channels_last):
        name = "channels_last" if layout is torch.channels_last else "contiguous"
        dense_l, model_l = dense.to(memory_format=layout), model.to(memory_format=layout)
        for batch in (1, 8):
            x = {"pixel_values": torch.randn(batch, 3, 224, 224, generator=g).contiguous(memory_format=layout)}
            dense_s, small_s = timed(dense_l, x, args.rounds, model_l)
            results["speedup"][f"{name} batch {batch}"] = dense_s / small_s
            print(f"{name:13s} batch {batch}: dense {dense_s * 1e3:8.1f} ms, shrunk {small_s * 1e3:8.1f} ms, "
                  f"speedup {dense_s / small_s:.2f}x (multiply-adds {left:.1%} of dense)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
