"""N:M, block and channel structures: every group, block and row of every mask is checked."""

import pytest
import torch
from torch import nn

from sparsenet.pruning import Block, Channel, available_structures, prune


def as_matrix(mask):
    return mask.reshape(mask.shape[0], -1)


def assert_nm(mask, n, m):
    groups = as_matrix(mask).reshape(-1, m)
    assert (groups.sum(1) == n).all()


def assert_blocks(mask, r, c):
    rows, cols = as_matrix(mask).shape
    tiles = as_matrix(mask).reshape(rows // r, r, cols // c, c).transpose(1, 2).reshape(-1, r * c)
    assert (tiles.all(1) | ~tiles.any(1)).all()  # each block all kept or all removed
    return ~tiles.any(1)  # removed blocks


def assert_channels(mask):
    rows = as_matrix(mask)
    assert (rows.all(1) | ~rows.any(1)).all()
    return ~rows.any(1)  # removed rows


def model():
    torch.manual_seed(0)
    # Weight matrices 8x72 (conv: 8*3*3 per filter), 16x128, 12x16: all tiled by 4x4, grouped by 8.
    return nn.Sequential(
        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
        nn.Linear(16, 12),
    )


def test_available():
    assert available_structures() == ["unstructured", "channel", "block", "N:M"]


# --- N:M ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, n, m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8), ("3:8", 3, 8)])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nm_every_group_keeps_exactly_n_largest(spec, n, m, scope):
    net = model()
    pruner = prune(net, structure=spec, scope=scope, progress=False)
    assert pruner.sparsity == pytest.approx((m - n) / m)
    for name, mask in pruner.masks.items():
        assert_nm(mask, n, m)
        w = as_matrix(net.get_submodule(name).parametrizations.weight.original.detach().abs())
        groups, keep = w.reshape(-1, m), as_matrix(mask).reshape(-1, m)
        low_kept = torch.where(keep, groups, torch.inf).min(1).values
        high_removed = torch.where(keep, -torch.inf, groups).max(1).values
        assert (low_kept >= high_removed).all(), name


def test_nm_ties_go_to_lower_index_and_sparsity_may_repeat_its_own():
    layer = nn.Linear(8, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    pruner = prune(nn.Sequential(layer), 0.5, structure="2:4", progress=False)
    expected = torch.tensor([False, False, True, True]).repeat(2, 2)
    assert torch.equal(pruner.masks["0"], expected)


def test_nm_with_calibrated_criterion():
    net = model()
    calib = [torch.randn(3, 8, 6, 6)]
    pruner = prune(net, structure="2:4", criterion="wanda", calib=calib, progress=False)
    for mask in pruner.masks.values():
        assert_nm(mask, 2, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"structure": "4:4"}, r"1 <= N < M, got 4:4"),
        ({"structure": "5:4"}, r"1 <= N < M"),
        ({"structure": "0:4"}, r"1 <= N < M"),
        (
            {"structure": "2:4", "sparsity": 0.75},
            r"'2:4' fixes sparsity at 0.5; sparsity=0.75 conflicts",
        ),
        ({"structure": "2:4", "sparsity": 1.5}, r"sparsity must be a float"),
        # A structure that fits no layer at all (one that fits some skips the others).
        (
            {"structure": "1:5"},
            r"'1:5' fits no layer: 0: 1:5 needs its row length \(72\) to be a multiple of 5; "
            r"3: 1:5 needs its row length \(128\)",
        ),
        (
            {"structure": "block", "block": (3, 3), "sparsity": 0.5},
            r"'block' fits no layer: 0: block 3x3 does not tile its 8x72 weight matrix; 3: ",
        ),
        ({"structure": "block", "block": (0, 4)}, "two positive ints"),
        ({"structure": "block", "block": (4,)}, "two positive ints"),
        ({"structure": "channel", "block": (4, 4)}, r"only applies to structure='block'"),
        ({"structure": "channel"}, "sparsity is required"),
        ({"structure": Channel(), "sparsity": 0.5, "block": (4, 4)}, "only applies"),
    ],
)
def test_structure_errors_leave_model_untouched(kwargs, match, untouched):
    net = model()
    check = untouched(net)
    with pytest.raises(ValueError, match=match):
        prune(net, progress=False, **kwargs)
    check()


def test_structure_objects_validate_their_arguments():
    with pytest.raises(ValueError, match="norm must be 'l1' or 'l2'"):
        Channel(norm="l3")
    with pytest.raises(ValueError, match="two positive ints"):
        Block(4, 2.5)


# --- blocks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_blocks_all_or_nothing_exact_count_lowest_norm(sparsity, norm):
    net = model()
    pruner = prune(net, sparsity, structure=Block(4, 4, norm=norm), progress=False)
    for name, mask in pruner.masks.items():
        removed = assert_blocks(mask, 4, 4)
        assert int(removed.sum()) == round(sparsity * removed.numel()), name
        w = as_matrix(net.get_submodule(name).parametrizations.weight.original.detach().abs())
        rows, cols = w.shape
        tiles = w.reshape(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(-1, 16)
        score = tiles.sum(1) if norm == "l1" else tiles.pow(2).sum(1)
        if 0 < removed.sum() < removed.numel():
            assert score[removed].max() <= score[~removed].min()


def test_default_block_is_16x16_and_block_kwarg_works():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 32))
    removed = assert_blocks(prune(net, 0.5, structure="block", progress=False).masks["0"], 16, 16)
    assert removed.numel() == 6 and int(removed.sum()) == 3
    net = nn.Sequential(nn.Linear(48, 32))
    mask = prune(net, 0.5, structure="block", block=(8, 4), progress=False).masks["0"]
    assert int(assert_blocks(mask, 8, 4).sum()) == round(0.5 * 48)


def test_blocks_global_equal_brute_force():
    net = model()
    pruner = prune(net, 0.6, structure="block", block=(4, 4), scope="global", progress=False)
    means = []
    for name in pruner.masks:
        w = as_matrix(net.get_submodule(name).parametrizations.weight.original.detach().abs())
        rows, cols = w.shape
        means.append(w.reshape(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(-1, 16).mean(1))
    flat = torch.cat(means)
    removed = torch.zeros_like(flat, dtype=torch.bool)
    removed[torch.sort(flat, stable=True).indices[: round(0.6 * flat.numel())]] = True
    got = torch.cat([assert_blocks(m, 4, 4) for m in pruner.masks.values()])
    assert torch.equal(got, removed)


# --- channels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8])
def test_channels_all_or_nothing_exact_count(sparsity):
    net = model()
    pruner = prune(net, sparsity, structure="channel", progress=False)
    for name, mask in pruner.masks.items():
        removed = assert_channels(mask)
        assert int(removed.sum()) == round(sparsity * mask.shape[0]), name
        w = as_matrix(net.get_submodule(name).parametrizations.weight.original.detach().abs())
        if 0 < removed.sum() < removed.numel():
            assert w[removed].sum(1).max() <= w[~removed].sum(1).min()


def test_channel_norm_choice_matters():
    def pruned_row(norm):
        layer = nn.Linear(4, 2)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 1, 1]]))
        pruner = prune(nn.Sequential(layer), 0.5, structure=Channel(norm=norm), progress=False)
        mask = pruner.masks["0"]
        return int(assert_channels(mask).nonzero())

    assert pruned_row("l1") == 0  # L1: 3 < 4
    assert pruned_row("l2") == 1  # L2: 3 > 2


def test_channels_global_compare_per_weight_averages_and_land_within_half_a_channel():
    net = model()
    pruner = prune(net, 0.5, structure="channel", scope="global", progress=False)
    sizes, means = [], []
    for name, mask in pruner.masks.items():
        assert_channels(mask)
        w = as_matrix(net.get_submodule(name).parametrizations.weight.original.detach().abs())
        sizes += [w.shape[1]] * w.shape[0]
        means.append(w.mean(1))
    total = sum(sizes)
    removed = sum(int((~m).sum()) for m in pruner.masks.values())
    assert abs(removed - round(0.5 * total)) <= max(sizes) / 2
    # The removed rows are a lowest-mean prefix of the stable global order.
    order = torch.sort(torch.cat(means), stable=True).indices
    got = torch.cat([assert_channels(m) for m in pruner.masks.values()])
    k = int(got.sum())
    assert set(order[:k].tolist()) == set(got.nonzero().squeeze(1).tolist())


def test_channel_pruning_again_grows_the_removed_set():
    net = model()
    first = prune(net, 0.25, structure="channel", progress=False).masks
    first = {n: m.clone() for n, m in first.items()}
    second = prune(net, 0.5, structure="channel", progress=False).masks
    for name, mask in second.items():
        removed = assert_channels(mask)
        assert int(removed.sum()) == round(0.5 * mask.shape[0])
        assert not (mask & ~first[name]).any()  # subset of the old mask


@pytest.mark.parametrize("structure", ["channel", "block"])
def test_group_structures_with_taylor_and_global_scope(structure):
    net = model()
    calib = [(torch.randn(3, 8, 6, 6), torch.randint(0, 12, (3,)))]
    kw = {"block": (4, 4)} if structure == "block" else {}
    pruner = prune(
        net, 0.5, structure=structure, criterion="taylor", calib=calib, scope="global",
        progress=False, **kw,
    )
    for mask in pruner.masks.values():
        assert_blocks(mask, 4, 4) if structure == "block" else assert_channels(mask)


def test_nm_on_an_already_sparser_layer_keeps_old_zeros_and_at_most_n():
    net = model()
    old = {n: m.clone() for n, m in prune(net, 0.8, progress=False).masks.items()}
    pruner = prune(net, structure="2:4", progress=False)
    for name, mask in pruner.masks.items():
        assert not (mask & ~old[name]).any()
        assert (as_matrix(mask).reshape(-1, 4).sum(1) <= 2).all()
