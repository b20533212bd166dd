"""Allocation: global ranking with per-layer floors/caps (exact, vs brute force) and overrides."""

import pytest
import torch
from torch import nn

from sparsenet.pruning import CubicSchedule, prune
from sparsenet.pruning.allocation import bounded_lowest, bounded_split_lowest


def removed(pruner):
    return {n: int((~m).sum()) for n, m in pruner.masks.items()}


def brute_force(scores, k, floors, caps):
    """Greedy by the letter: floors first (each layer's lowest), then global stable order."""
    taken = [set(torch.sort(s, stable=True).indices[:f].tolist()) for s, f in zip(scores, floors)]
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    offset = [0]
    for s in scores:
        offset.append(offset[-1] + s.numel())
    need = k - sum(floors)
    for j in torch.sort(flat, stable=True).indices.tolist():
        i = int(owner[j])
        if need == 0:
            break
        if j - offset[i] not in taken[i] and len(taken[i]) < caps[i]:
            taken[i].add(j - offset[i])
            need -= 1
    return taken


@pytest.mark.parametrize("seed", range(30))
def test_bounded_lowest_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 12, (4,), generator=g).tolist()
    # Few distinct values: many ties across layers and at the threshold.
    scores = [torch.randint(0, 4, (n,), generator=g).float() for n in sizes]
    floors = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in sizes]
    caps = [int(torch.randint(f, n + 1, (1,), generator=g)) for f, n in zip(floors, sizes)]
    k = int(torch.randint(sum(floors), sum(caps) + 1, (1,), generator=g))
    counts = bounded_lowest(scores, [1] * 4, k, floors, caps)
    want = brute_force(scores, k, floors, caps)
    assert counts == [len(t) for t in want]
    assert sum(counts) == k
    assert bounded_split_lowest(scores, k, floors, caps) == counts
    # Per layer the chosen set is the layer's lowest `count` (what planner.mask takes).
    for s, c, t in zip(scores, counts, want):
        assert set(torch.sort(s, stable=True).indices[:c].tolist()) == t


@pytest.mark.parametrize("lo,hi", [(0.5, 0.98), (0.0, 0.7), (0.3, 1.0), (0.6, 0.6)])
def test_global_floors_caps_exact_and_brute_force(convnet, lo, hi):
    weights = {n: m.weight.detach().abs().reshape(-1) for n, m in convnet.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))}
    total = sum(w.numel() for w in weights.values())
    pruner = prune(convnet, 0.6, scope="global", min_sparsity=lo, max_sparsity=hi, progress=False)
    got = removed(pruner)
    assert sum(got.values()) == round(0.6 * total)
    for n, w in weights.items():
        assert round(lo * w.numel()) <= got[n] <= round(hi * w.numel())
    floors = [round(lo * w.numel()) for w in weights.values()]
    caps = [round(hi * w.numel()) for w in weights.values()]
    want = brute_force(list(weights.values()), round(0.6 * total), floors, caps)
    for (n, mask), t in zip(pruner.masks.items(), want):
        assert set((~mask).reshape(-1).nonzero().squeeze(1).tolist()) == t


def test_infeasible_bounds_raise_untouched(mlp, untouched):
    check = untouched(mlp)
    with pytest.raises(ValueError, match="caps allow only"):
        prune(mlp, 0.9, scope="global", max_sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="floors remove"):
        prune(mlp, 0.2, scope="global", min_sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        prune(mlp, 0.2, scope="global", min_sparsity=0.5, max_sparsity=0.4, progress=False)
    with pytest.raises(ValueError, match="scope='global'"):
        prune(mlp, 0.2, min_sparsity=0.1, progress=False)
    with pytest.raises(ValueError, match="match no prunable layer"):
        prune(mlp, 0.2, overrides={"9*": 0.1}, progress=False)
    with pytest.raises(ValueError, match="match no prunable layer"):
        prune(mlp, 0.2, overrides={nn.Conv2d: 0.1}, progress=False)
    with pytest.raises(ValueError, match="float in"):
        prune(mlp, 0.2, overrides={"0": 1.5}, progress=False)
    with pytest.raises(ValueError, match="needs scope='global'"):
        prune(mlp, 0.2, overrides={"0": (0.1, 0.5)}, progress=False)
    with pytest.raises(ValueError, match="only exclude"):
        prune(mlp, structure="2:4", overrides={"0": 0.3}, progress=False)
    with pytest.raises(ValueError, match="no prunable layers left"):
        prune(mlp, 0.2, overrides=lambda n, m: 0, progress=False)
    check()


def test_overrides_layer_scope_name_glob_type_callable(convnet):
    # exact name beats the glob, the glob beats the type; "classifier" skipped with 0.
    over = {nn.Linear: 0.2, "features.*": 0.5, "features.2": 0.75, "classifier": 0}
    pruner = prune(convnet, 0.9, overrides=over, progress=False)
    layers = dict(convnet.named_modules())
    assert list(pruner.masks) == ["features.0", "features.2", "head.1"]
    for name, frac in {"features.0": 0.5, "features.2": 0.75, "head.1": 0.2}.items():
        assert removed(pruner)[name] == round(frac * layers[name].weight.numel())


def test_overrides_callable_and_exclude_wins(convnet):
    calls = []

    def rule(name, module):
        calls.append(name)
        return 0.1 if isinstance(module, nn.Conv2d) else None  # None: default 0.5

    pruner = prune(convnet, 0.5, exclude=["classifier"], overrides=rule, progress=False)
    assert "classifier" not in calls and "classifier" not in pruner.masks
    got, layers = removed(pruner), dict(convnet.named_modules())
    assert got["features.0"] == round(0.1 * layers["features.0"].weight.numel())
    assert got["head.1"] == round(0.5 * layers["head.1"].weight.numel())


def test_global_overrides_pin_and_bounds(mlp):
    pruner = prune(mlp, 0.3, scope="global", max_sparsity=0.9,
                   overrides={"0": 0.25, "2": (None, 0.5), "4": None}, progress=False)
    got = removed(pruner)
    assert list(got) == ["0", "2"]  # "4" skipped and out of the total (190 weights)
    assert got == {"0": 30, "2": round(0.3 * 190) - 30}


def test_channel_floors_caps_in_units(convnet):
    pruner = prune(convnet, 0.5, scope="global", structure="channel",
                   min_sparsity=0.25, max_sparsity=0.75, progress=False)
    for name, mask in pruner.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        gone = int((~rows.any(1)).sum())
        assert round(0.25 * rows.shape[0]) <= gone <= round(0.75 * rows.shape[0])


def test_nm_overrides_can_exclude():
    pruner = prune(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4)), structure="2:4",
                   overrides={"1": 0}, progress=False)
    assert list(pruner.masks) == ["0"]


def test_gradual_schedule_with_bounds(mlp):
    schedule = CubicSchedule(start=0, end=4, frequency=1)
    pruner = prune(mlp, 0.8, scope="global", min_sparsity=0.5, max_sparsity=0.9,
                   schedule=schedule, progress=False)
    for _ in range(4):
        pruner.step()
    got = removed(pruner)
    assert sum(got.values()) == round(0.8 * 211)
    for name, layer in pruner.layers.items():
        n = layer.parametrizations.weight.original.numel()
        assert round(0.5 * n) <= got[name] <= round(0.9 * n)


def test_state_dict_records_allocation(mlp):
    pruner = prune(mlp, 0.5, scope="global", max_sparsity=0.9, overrides={nn.Linear: (0.1, None)},
                   progress=False)
    settings = pruner.state_dict()["settings"]
    assert settings["max_sparsity"] == 0.9 and settings["overrides"] == {"Linear": (0.1, None)}
    pruner.load_state_dict(pruner.state_dict())  # same settings: accepted


def test_block_floors_caps_in_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8))  # 4, 8, 8 blocks
    pruner = prune(model, 0.5, scope="global", structure="block", block=(4, 4),
                   min_sparsity=0.25, max_sparsity=0.5, progress=False)
    blocks = {n: int((~m).sum()) // 16 for n, m in pruner.masks.items()}
    assert sum(blocks.values()) == 10
    assert all(round(0.25 * n) <= blocks[k] <= round(0.5 * n) for k, n in zip("012", (4, 8, 8)))
