"""Random criterion reproducibility and custom criteria."""

import torch

from sparsenet.pruning import available_criteria, prune


def masks_of(model_fn, **kw):
    return prune(model_fn(), 0.5, criterion="random", progress=False, **kw).masks


def test_random_is_reproducible_with_a_seed(convnet):
    from copy import deepcopy

    a = masks_of(lambda: deepcopy(convnet), seed=3)
    b = masks_of(lambda: deepcopy(convnet), seed=3)
    c = masks_of(lambda: deepcopy(convnet), seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_random_without_seed_follows_global_rng(convnet):
    from copy import deepcopy

    torch.manual_seed(11)
    a = masks_of(lambda: deepcopy(convnet))
    torch.manual_seed(11)
    b = masks_of(lambda: deepcopy(convnet))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_random_global_counts_exact(convnet):
    pruner = prune(convnet, 0.65, criterion="random", scope="global", seed=0, progress=False)
    total = sum(m.numel() for m in pruner.masks.values())
    assert sum(int((~m).sum()) for m in pruner.masks.values()) == round(0.65 * total)


def test_callable_criterion(mlp):
    # Prune the largest weights instead: exercises the (layer, ctx) -> scores contract.
    pruner = prune(mlp, 0.5, criterion=lambda layer, ctx: -layer.weight.abs(), progress=False)
    w = mlp[0].parametrizations.weight.original.detach().abs()
    mask = pruner.masks["0"]
    assert w[~mask].min() >= w[mask].max()


def test_known_criteria():
    assert {"magnitude", "random"} <= set(available_criteria())
