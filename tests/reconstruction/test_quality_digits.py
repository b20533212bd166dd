"""Quality bar on models trained in the test: one-shot pruning, no fine-tuning unless stated.

All figures are on the held-out test split, which calibration never sees. SparseGPT is the
honest baseline: sequential over blocks, damping 1% of the mean Hessian diagonal, column blocks
of 128, every layer of a block from one pass (as in its paper). Run with ``-s`` to see the
side-by-side table (also recorded in BENCHMARKS.md).
"""

import copy
import functools

import pytest
import torch

import sparsenet
from sparsenet.reconstruction import finetune, reconstruct

from digits_models import DigitsBert, DigitsCNN, calib_batches, digits, evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("transformers")

SEEDS = (0, 1, 2)
SPARSEGPT = dict(method="sparsegpt", blockwise=False, correct=False, within_stage="parallel", damp=0.01)
# The embedding and the classifier are tiny and sit on the model's edges; the paper's
# transformer experiments likewise prune the blocks only.
EXCLUDE = ["embed", "classifier"]


@functools.lru_cache(maxsize=None)
def trained_bert(seed):
    torch.manual_seed(seed)
    data = digits(seed)
    return train(DigitsBert(layers=2), data, epochs=15, seed=seed), data


def one_shot(seed, sparsity):
    dense, data = trained_bert(seed)
    calib = calib_batches(data)
    rows = {"dense": evaluate(dense, dense, data)}
    for name, criterion in (("magnitude", "magnitude"), ("wanda", "wanda")):
        m = copy.deepcopy(dense)
        sparsenet.prune(m, sparsity, criterion=criterion, calib=calib, exclude=EXCLUDE)
        rows[name] = evaluate(m, dense, data)
    for name, kwargs in (("sparsegpt", SPARSEGPT), ("sparsenet", {})):
        m = copy.deepcopy(dense)
        reconstruct(m, calib, sparsity, exclude=EXCLUDE, progress=False, **kwargs)
        rows[name] = evaluate(m, dense, data)
    return rows


@functools.lru_cache(maxsize=None)
def table(sparsity):
    runs = [one_shot(seed, sparsity) for seed in SEEDS]
    mean = {k: tuple(sum(r[k][i] for r in runs) / len(runs) for i in range(2)) for k in runs[0]}
    print(f"\nBERT-style encoder on digits, {sparsity:.0%} unstructured, mean of {len(SEEDS)} seeds")
    for k, (acc, err) in mean.items():
        print(f"  {k:10s} accuracy {acc:.4f}   1 - cos {err:.6f}")
    return runs, mean


def test_best_recipe_halves_sparsegpt_output_error_at_70():
    runs, mean = table(0.7)
    assert mean["sparsenet"][1] <= 0.5 * mean["sparsegpt"][1]
    for r in runs:  # and on every seed, not only on average
        assert r["sparsenet"][1] <= 0.5 * r["sparsegpt"][1]
    # The baselines are ordered as the literature says, or the comparison would be suspect.
    assert mean["sparsegpt"][1] < mean["magnitude"][1]


def test_best_recipe_loses_at_most_half_a_point_at_50():
    _, mean = table(0.5)
    assert mean["dense"][0] - mean["sparsenet"][0] <= 0.005
    assert mean["sparsenet"][1] <= mean["sparsegpt"][1]


@functools.lru_cache(maxsize=None)
def trained_cnn(seed):
    torch.manual_seed(seed)
    data = digits(seed)
    return train(DigitsCNN(), data, epochs=8, seed=seed), data


def test_cnn_at_90_reconstruction_keeps_accuracy_and_fine_tuning_closes_the_gap():
    losses = {"magnitude": [], "reconstructed": [], "fine-tuned": []}
    for seed in SEEDS:
        dense, data = trained_cnn(seed)
        acc = evaluate(dense, dense, data)[0]
        magnitude = copy.deepcopy(dense)
        sparsenet.prune(magnitude, 0.9)
        losses["magnitude"].append(acc - evaluate(magnitude, dense, data)[0])
        rebuilt = copy.deepcopy(dense)
        result = reconstruct(rebuilt, calib_batches(data), 0.9, progress=False)
        assert result.sparsity == pytest.approx(0.9, abs=0.005)
        losses["reconstructed"].append(acc - evaluate(rebuilt, dense, data)[0])
        # A short masked fine-tune on the training split, distilling from the dense model.
        train_batches = list(zip(data.x_train.split(64), data.y_train.split(64)))
        finetune(rebuilt, train_batches, epochs=10, lr=1e-3, teacher=dense, progress=False, seed=seed)
        assert 1 - float(result.masks["features.0"].float().mean()) == pytest.approx(0.9, abs=0.01)
        losses["fine-tuned"].append(acc - evaluate(rebuilt, dense, data)[0])
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    print("\nCNN on digits at 90%, accuracy points lost (mean of seeds):",
          ", ".join(f"{k} {100 * v:.2f}" for k, v in mean.items()))
    assert mean["reconstructed"] <= 0.03
    assert mean["magnitude"] >= 0.3
    assert mean["fine-tuned"] <= 0.005
