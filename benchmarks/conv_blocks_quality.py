"""What pruning convolutions in blocks of output channels costs in accuracy, against unstructured
pruning at the same sparsity: a small CNN trained on scikit-learn's digits (8x8 images, 1,797 of them;
1,347 to train, 450 held out), its convolutions magnitude-pruned layer by layer, then fine-tuned with
the masks held, test accuracy before and after the fine-tuning, mean over seeds.

    python benchmarks/conv_blocks_quality.py [--sparsities 0.7,0.8,0.9] [--seeds 3] [--epochs 30]

Blocks of 4 output channels x 1 weight column (``structure="block", block=(4, 1)``) are what the
convolution kernel runs 4 rows at a time (BENCHMARKS.md, "Formats II"). The first convolution (9
weights per filter) and the classifier stay dense, as stems and heads usually do. A small model on a
small dataset: it shows the direction and rough size of the cost, not ImageNet's.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from sklearn.datasets import load_digits
from torch import nn

import sparsenet

STRUCTURES = {"unstructured": {}, "blocks 4x1": {"structure": "block", "block": (4, 1)}}


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 16, 10))


def batches(x, y, size, generator):
    order = torch.randperm(len(x), generator=generator)
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.7,0.8,0.9")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs; fine-tuning takes a third")
    args = parser.parse_args(argv)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = split[:1347], split[1347:]
    results = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model = cnn()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(args.epochs):
            model.train()
            for xb, yb in batches(x[train], y[train], 64, g):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
        results.setdefault(("dense", 0.0), []).append((accuracy(model, x[test], y[test]),) * 2)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for name, structure in STRUCTURES.items():
                pruned = copy.deepcopy(model)
                sparsenet.prune(pruned, sparsity, exclude=["0", "8"], progress=False, **structure)
                one_shot = accuracy(pruned, x[test], y[test])
                data = batches(x[train], y[train], 64, g)
                sparsenet.finetune(pruned, data, epochs=max(1, args.epochs // 3), lr=1e-3, progress=False, seed=seed)
                results.setdefault((name, sparsity), []).append((one_shot, accuracy(pruned, x[test], y[test])))
    print(f"digits CNN (3 convolutions, 32/64/64 channels; the last two pruned), {args.seeds} seeds, "
          f"test accuracy (held out)")
    print("| convolutions | sparsity | one-shot | after fine-tuning |\n|---|---|---|---|")
    for (name, sparsity), runs in results.items():
        one_shot, tuned = (statistics.mean(r[i] for r in runs) for i in (0, 1))
        print(f"| {name} | {sparsity:.0%} | {one_shot:.1%} | {tuned:.1%} |")


if __name__ == "__main__":
    main()
