"""Gradual pruning of a digits MLP to 90% stays within a point of dense; one-shot does not."""

import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.pruning import CubicSchedule

DENSE_EPOCHS, PRUNE_EPOCHS, TUNE_EPOCHS = 15, 5, 5
BATCH = 64


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, x, y, epochs, seed, pruner=None):
    # A fresh optimizer per phase, as a user fine-tuning a loaded model would have.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if pruner is not None:
                pruner.step()


def test_gradual_90_percent_matches_dense_and_beats_one_shot(one_thread, standardized_digits):
    xtr, ytr, xte, yte = standardized_digits
    steps_per_epoch = -(-len(xtr) // BATCH)
    dense_acc, one_shot_acc, gradual_acc = [], [], []
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        train(model, xtr, ytr, DENSE_EPOCHS, seed)

        one_shot = copy.deepcopy(model)
        sparsenet.prune(one_shot, 0.9, progress=False)
        one_shot_acc.append(accuracy(one_shot, xte, yte))

        # Dense reference trained as long as the pruned model, on the same batches.
        dense = copy.deepcopy(model)
        train(dense, xtr, ytr, PRUNE_EPOCHS + TUNE_EPOCHS, seed + 100)
        dense_acc.append(accuracy(dense, xte, yte))

        schedule = CubicSchedule(
            start=0, end=PRUNE_EPOCHS * steps_per_epoch, frequency=steps_per_epoch // 4
        )
        pruner = sparsenet.prune(model, sparsity=0.9, schedule=schedule, progress=False)
        train(model, xtr, ytr, PRUNE_EPOCHS + TUNE_EPOCHS, seed + 100, pruner)
        pruner.finalize()
        weights = [model[i].weight for i in (0, 2, 4)]
        assert sum(int((w == 0).sum()) for w in weights) == sum(
            round(0.9 * w.numel()) for w in weights
        )
        gradual_acc.append(accuracy(model, xte, yte))

    dense, one_shot, gradual = (statistics.mean(a) for a in (dense_acc, one_shot_acc, gradual_acc))
    print(f"\ndigits MLP, mean of 3 seeds: dense {dense:.2%}, gradual 90% {gradual:.2%}, "
          f"one-shot 90% magnitude (no fine-tuning) {one_shot:.2%}")
    assert gradual >= dense - 0.01
    assert one_shot < gradual - 0.05
