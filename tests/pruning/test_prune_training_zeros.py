"""A user's own training loop keeps every pruned weight at exactly zero, and so does finalize()."""

import pytest
import torch
import torch.nn.functional as F

from sparsenet.pruning import CubicSchedule, prune

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def train_step(model, opt, gen):
    x = torch.randn(16, 12, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def assert_pruned_read_zero(pruner):
    for name, layer in pruner.layers.items():
        assert torch.all(layer.weight[~pruner.masks[name]] == 0), name


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_plain_loop_after_one_shot_prune(mlp, make_opt):
    gen = torch.Generator().manual_seed(0)
    # The optimizer exists before pruning and has momentum / running averages for every weight,
    # so the stored originals under the mask keep moving after pruning.
    opt = make_opt(mlp.parameters())
    for _ in range(3):
        train_step(mlp, opt, gen)
    pruner = prune(mlp, 0.7, progress=False)
    originals = {
        n: l.parametrizations.weight.original.detach().clone() for n, l in pruner.layers.items()
    }
    for _ in range(10):
        train_step(mlp, opt, gen)  # no sparsenet call in between
        assert_pruned_read_zero(pruner)
    drifted = False
    for name, layer in pruner.layers.items():
        gone = ~pruner.masks[name]
        original = layer.parametrizations.weight.original.detach()
        drifted |= not torch.equal(original[gone], originals[name][gone])
    assert drifted  # the stored originals move; the parametrization hides it from every read
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    params = {n: l.parametrizations.weight.original for n, l in pruner.layers.items()}
    pruner.finalize()
    for name, layer in pruner.layers.items():
        assert layer.weight is params[name]  # the optimizer's Parameter, now holding the zeros
        assert torch.all(layer.weight[~masks[name]] == 0)
        assert int((layer.weight == 0).sum()) == int((~masks[name]).sum())


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_plain_loop_with_gradual_pruning(mlp, make_opt):
    gen = torch.Generator().manual_seed(1)
    opt = make_opt(mlp.parameters())
    pruner = prune(mlp, 0.8, schedule=CubicSchedule(start=0, end=12, frequency=3), progress=False)
    for _ in range(15):
        train_step(mlp, opt, gen)
        assert_pruned_read_zero(pruner)
        pruner.step()
        assert_pruned_read_zero(pruner)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    pruner.finalize()
    for name, layer in pruner.layers.items():
        assert torch.all(layer.weight[~masks[name]] == 0)
        assert int((~masks[name]).sum()) == round(0.8 * layer.weight.numel())
