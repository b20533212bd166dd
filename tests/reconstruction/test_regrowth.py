"""RigL regrowth: constant kept counts, moved masks, zero-initialised growth, dense gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.pruning import find_weight_mask
from sparsenet.reconstruction.finetune import finetune
from sparsenet.reconstruction.regrowth import RigL, regrow_layer


pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_layer(sparsity=0.7):
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    sparsenet.prune(nn.Sequential(layer), sparsity, progress=False)
    return layer


def test_regrow_layer_moves_k_weights_by_magnitude_and_gradient():
    layer = pruned_layer()
    wm = find_weight_mask(layer)
    mask, before = wm.mask, wm.mask.clone()
    original = layer.parametrizations.weight.original
    w_before = layer.weight.detach().clone()
    grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))

    dropped, grown = regrow_layer(layer, grad, 4)

    assert find_weight_mask(layer).mask is mask  # updated in place
    assert int(mask.sum()) == int(before.sum())
    flat_before = before.view(-1)
    assert flat_before[dropped].all() and not flat_before[grown].any()
    assert not set(dropped.tolist()) & set(grown.tolist())
    # Dropped: the 4 smallest |w| among the kept; grown: the 4 largest |grad| among the pruned.
    kept = flat_before.nonzero().view(-1)
    smallest = kept[w_before.view(-1)[kept].abs().argsort()[:4]]
    assert set(dropped.tolist()) == set(smallest.tolist())
    pruned = (~flat_before).nonzero().view(-1)
    largest = pruned[grad.view(-1)[pruned].abs().argsort(descending=True)[:4]]
    assert set(grown.tolist()) == set(largest.tolist())
    expected = flat_before.clone()
    expected[dropped], expected[grown] = False, True
    assert torch.equal(mask.view(-1), expected)
    # Grown weights start at zero; pruned positions read zero; the other kept weights are as were.
    assert not original.view(-1)[grown].any()
    assert not layer.weight[~mask].any()
    stay = before & mask
    assert torch.equal(layer.weight[stay], w_before[stay])


def test_regrow_layer_resets_adam_moments_of_grown_weights():
    layer = pruned_layer()
    original = layer.parametrizations.weight.original
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(4, 8)).sum().backward()
    opt.step()
    state = opt.state[original]
    state["exp_avg"].fill_(1.0)
    state["exp_avg_sq"].fill_(1.0)
    _, grown = regrow_layer(layer, torch.randn(6, 8), 3, opt)
    assert grown.numel() == 3
    assert not state["exp_avg"].view(-1)[grown].any()
    assert not state["exp_avg_sq"].view(-1)[grown].any()
    assert int((state["exp_avg"] == 1.0).sum()) == 48 - 3


def test_regrow_layer_limits_and_errors():
    layer = pruned_layer(0.9)  # 5 kept of 48
    dropped, grown = regrow_layer(layer, torch.randn(6, 8), 100)
    assert dropped.numel() == grown.numel() == 5
    with pytest.raises(ValueError, match="shape"):
        regrow_layer(layer, torch.randn(8, 6), 1)
    with pytest.raises(ValueError, match="NaN"):
        regrow_layer(layer, torch.full((6, 8), float("nan")), 1)
    with pytest.raises(ValueError, match="k must"):
        regrow_layer(layer, torch.randn(6, 8), -1)
    with pytest.raises(ValueError, match="no sparsenet mask"):
        regrow_layer(nn.Linear(8, 6), torch.randn(6, 8), 1)


def test_rigl_settings_and_cosine_decay():
    rigl = RigL(drop_fraction=0.4, every=10)
    assert rigl.fraction_at(0, 100) == pytest.approx(0.4)
    assert rigl.fraction_at(50, 100) == pytest.approx(0.2)
    assert rigl.fraction_at(25, 100) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert rigl.fraction_at(100, 100) == 0.0
    for bad in (dict(drop_fraction=0.0), dict(drop_fraction=1.0), dict(every=0), dict(end=0),
                dict(every=2.5)):
        with pytest.raises(ValueError):
            RigL(**bad)
    with pytest.raises(ValueError, match="masked"):
        RigL().attach(nn.Sequential(nn.Linear(2, 2)), total_steps=10)
    with pytest.raises(ValueError, match="end="):
        RigL().attach(nn.Sequential(pruned_layer()))


def data(n=256, batch=32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    sparsenet.prune(model, 0.75, progress=False)
    return model


def test_finetune_with_rigl_keeps_counts_and_moves_masks():
    model = mlp()
    masks = {n: find_weight_mask(model[i]).mask for n, i in (("0", 0), ("2", 2))}
    before = {n: m.clone() for n, m in masks.items()}
    result = finetune(model, data(), epochs=5, lr=1e-2, regrow=RigL(0.3, every=4),
                      progress=False, seed=0)
    assert result.steps == 40
    assert [u.step for u in result.regrowth] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    fractions = [u.drop_fraction for u in result.regrowth]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] < 0.3
    assert result.regrowth[0].moved == {"0": round(fractions[0] * 32), "2": round(fractions[0] * 12)}
    for name, mask in masks.items():
        i = int(name)
        assert find_weight_mask(model[i]).mask is mask
        assert int(mask.sum()) == int(before[name].sum())
        assert not torch.equal(mask, before[name])
        assert not model[i].weight[~mask].any()


def test_grown_weights_follow_the_dense_gradient_and_start_at_zero():
    model = mlp()
    batch = data()[0]
    # The dense gradient w.r.t. the effective weights, from a plain copy.
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(model[i].weight)
            dense[i].bias.copy_(model[i].bias)
    F.cross_entropy(dense(batch[0]), batch[1]).backward()
    before = {i: find_weight_mask(model[i]).mask.clone() for i in (0, 2)}
    w_before = {i: model[i].weight.detach().clone() for i in (0, 2)}

    result = finetune(model, [batch], max_steps=1, lr=1e-2, regrow=RigL(0.5, every=1, end=2),
                      progress=False)
    fraction = result.regrowth[0].drop_fraction
    assert fraction == pytest.approx(0.25)
    for i in (0, 2):
        mask = find_weight_mask(model[i]).mask
        k = round(fraction * int(before[i].sum()))
        grown = (mask & ~before[i]).view(-1).nonzero().view(-1)
        assert grown.numel() == k
        pruned = (~before[i]).view(-1).nonzero().view(-1)
        g = dense[i].weight.grad.view(-1)
        expected = pruned[g[pruned].abs().argsort(descending=True)[:k]]
        assert set(grown.tolist()) == set(expected.tolist())
        assert not model[i].weight.view(-1)[grown].any()
        # The update step replaced the optimizer step: the weights that stayed did not move.
        stay = before[i] & mask
        assert torch.equal(model[i].weight[stay], w_before[i][stay])
        assert not model[i].parametrizations.weight._forward_hooks


def test_rigl_needs_end_when_the_run_length_is_unknown():
    class Stream:
        def __iter__(self):
            return iter(data())

    with pytest.raises(ValueError, match="end="):
        finetune(mlp(), Stream(), regrow=RigL(), progress=False)
    result = finetune(mlp(), Stream(), max_steps=6, regrow=RigL(every=3), progress=False)
    assert [u.step for u in result.regrowth] == [3]
