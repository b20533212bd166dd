"""Non-uniform allocation: OWL outlier ratios, the sensitivity search, and prune(allocation=...)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenet.pruning import (
    block_groups, find_prunable_layers, owl_sparsities, prune, search_sparsities,
)
from sparsenet.pruning.nonuniform import choose_levels, shift_to_total


def weighted_mean(per_layer, layers):
    total = sum(m.weight.numel() for m in layers.values())
    return sum(per_layer[n] * layers[n].weight.numel() for n in layers) / total


def outlier_mlp(planted="2"):
    """Three equal Linear layers; layer ``planted`` gets a few huge weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)
    )
    with torch.no_grad():
        w = model.get_submodule(planted).weight
        idx = torch.randperm(w.numel())[:12]
        w.view(-1)[idx] = 50.0
    return model


def calib_for(n_in, n=3, batch=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, n_in, generator=g) for _ in range(n)]


def output_error(model, calib):
    with torch.no_grad():
        return sum(float((1 - F.cosine_similarity(model(x), ref, dim=1)).mean())
                   for x, ref in calib) / len(calib)


# --- OWL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_owl_weighted_mean_is_exact(convnet, sparsity):
    layers = find_prunable_layers(convnet)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    got = owl_sparsities(convnet, layers, calib, sparsity, lam=0.1, m=2.0)
    assert list(got) == list(layers)
    assert weighted_mean(got, layers) == pytest.approx(sparsity, abs=1e-12)
    assert all(0.0 <= s < 1.0 for s in got.values())


def test_owl_planted_outliers_get_lowest_sparsity():
    model = outlier_mlp("2")
    layers = find_prunable_layers(model)
    got = owl_sparsities(model, layers, calib_for(16), 0.5)
    assert got["2"] == min(got.values()) < 0.5
    # The range is 2 * lam wide: the most outlier-rich layer sits lam below the least one's mid.
    assert max(got.values()) - got["2"] == pytest.approx(2 * 0.08)
    assert weighted_mean(got, layers) == pytest.approx(0.5, abs=1e-12)


def test_owl_large_lam_clamps_and_keeps_total(convnet):
    layers = find_prunable_layers(convnet)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    for s in (0.1, 0.9):
        got = owl_sparsities(convnet, layers, calib, s, lam=0.9, m=2.0)
        caps = {n: 1 - 1 / m.weight.numel() for n, m in layers.items()}
        assert all(0.0 <= got[n] <= caps[n] for n in layers)
        assert any(got[n] in (0.0, caps[n]) for n in layers)  # something was clamped
        assert weighted_mean(got, layers) == pytest.approx(s, abs=1e-12)


def test_owl_lam_zero_or_equal_ratios_is_uniform(mlp):
    layers = find_prunable_layers(mlp)
    got = owl_sparsities(mlp, layers, calib_for(12), 0.4, lam=0.0)
    assert got == pytest.approx({n: 0.4 for n in layers})


def test_block_groups():
    names = ["encoder.layer.3.attention.self.query", "encoder.layer.3.output.dense",
             "encoder.layer.10.intermediate.dense", "pooler.dense", "classifier", "0"]
    assert block_groups(names) == {
        names[0]: "encoder.layer.3", names[1]: "encoder.layer.3",
        names[2]: "encoder.layer.10", "pooler.dense": "pooler.dense",
        "classifier": "classifier", "0": "0",
    }


def test_owl_groups_share_one_ratio():
    # Planted in the last layer, so no other layer's inputs inherit the outliers.
    model = outlier_mlp("4")
    layers = find_prunable_layers(model)
    groups = {"2": "0", "4": "0"}  # "0" absent: stands alone, though a group key reads "0"
    got = owl_sparsities(model, layers, calib_for(16), 0.5, groups=groups)
    assert got["2"] == got["4"]
    assert weighted_mean(got, layers) == pytest.approx(0.5, abs=1e-12)
    # The planted group holds the outliers, so it is pruned less than the lone layer.
    assert got["4"] < got["0"]


def test_shift_to_total_is_exact_and_clamped():
    got = shift_to_total([0.9, 0.1, 0.5], [10, 30, 60], [0.95, 0.95, 0.95], 0.6)
    assert sum(s * n for s, n in zip(got, [10, 30, 60])) == pytest.approx(60.0, abs=1e-9)
    assert max(got) <= 0.95
    with pytest.raises(ValueError, match="no weights"):
        shift_to_total([0.5], [4], [0.75], 0.9)


# --- search ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.05, 0.5, 0.95])
def test_search_weighted_mean_is_exact(convnet, sparsity):
    layers = find_prunable_layers(convnet)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    got = search_sparsities(convnet, layers, calib, sparsity, progress=False)
    assert weighted_mean(got, layers) == pytest.approx(sparsity, abs=1e-12)
    assert all(0.0 <= s <= 0.99 for s in got.values())


def test_choose_levels_prefers_the_insensitive_layer():
    levels = [0.3, 0.5, 0.7]
    errors = {"steep": [0.0, 1.0, 5.0], "flat": [0.0, 0.01, 0.02]}
    got = choose_levels(errors, levels, {"steep": 100, "flat": 100}, 0.5)
    assert got == pytest.approx({"steep": 0.3, "flat": 0.7})
    # One layer ends between two levels so the total is exact.
    got = choose_levels(errors, levels, {"steep": 100, "flat": 100}, 0.55)
    assert got["flat"] == 0.7 and got["steep"] == pytest.approx(0.4)


def test_search_leaves_model_untouched(mlp, untouched):
    mlp.train()
    mlp[1].eval()
    check = untouched(mlp)
    search_sparsities(mlp, find_prunable_layers(mlp), calib_for(12), 0.5, progress=False)
    check()


def test_search_leaves_masked_model_untouched(mlp):
    prune(mlp, 0.3, progress=False)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    originals = list(mlp.parameters())
    search_sparsities(mlp, find_prunable_layers(mlp), calib_for(12), 0.5, progress=False)
    after = mlp.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert list(mlp.parameters()) == originals
    assert all(len(mlp[i].parametrizations["weight"]) == 1 for i in (0, 2, 4))


class Flaky(nn.Module):
    """Raises on the ``fail_at``-th forward: a model that breaks mid-search."""

    def __init__(self, inner, fail_at):
        super().__init__()
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("fail_at", [5, 9])  # after the dense pass (2 batches), mid-trial
def test_search_restores_model_when_forward_raises(mlp, untouched, fail_at):
    model = Flaky(mlp, fail_at)
    model.train()
    check = untouched(model)
    with pytest.raises(RuntimeError, match="boom"):
        search_sparsities(model, find_prunable_layers(model), calib_for(12, n=2),
                          0.5, criterion="magnitude", progress=False)
    check()


def test_search_beats_uniform_when_one_layer_dominates():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    )
    with torch.no_grad():
        # Layer 0: every weight matters equally (sensitive). Layer 2: a few large weights carry
        # it, the rest are near zero (prunable almost for free).
        model[0].weight.copy_(torch.randn(32, 32).sign() / 32 ** 0.5)
        w2 = torch.randn(32, 32) * 1e-3
        w2.view(-1)[torch.randperm(w2.numel())[:200]] = torch.randn(200)
        model[2].weight.copy_(w2)
    calib = calib_for(32, n=4, batch=16)
    with torch.no_grad():
        pairs = [(x, model(x)) for x in calib]
    errs = {}
    for allocation in ("uniform", "search"):
        pruned = copy.deepcopy(model)
        prune(pruned, 0.6, "wanda", calib=calib, allocation=allocation, progress=False)
        errs[allocation] = output_error(pruned, pairs)
    assert errs["search"] < errs["uniform"]


def test_search_drops_padding_positions():
    # A position-wise model: what padded positions hold must not change the search, since their
    # outputs are dropped (mask == 0). Huge values there would dominate the error otherwise.
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 32)
            self.down = nn.Linear(32, 8)

        def forward(self, input_ids, attention_mask):
            return {"last_hidden_state": self.down(torch.relu(self.up(input_ids)))}

    torch.manual_seed(0)
    model = Seq()
    with torch.no_grad():
        model.down.weight[:, :16] *= 10.0  # layers of unequal importance: the levels differ
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]] * 4)
    x = torch.randn(8, 6, 8)
    noisy = x.clone()
    noisy[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), 8)
    results = []
    for inputs in (x, noisy):
        calib = [{"input_ids": inputs, "attention_mask": mask}]
        results.append(search_sparsities(model, find_prunable_layers(model), calib, 0.5,
                                         criterion="magnitude"))
    assert results[0] == results[1]
    assert len(set(results[0].values())) > 1  # a real choice was made, not the uniform answer


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"lam": -0.1}, "lam must be >= 0"),
    ({"lam": float("nan")}, "lam must be a finite float"),
    ({"m": 0.0}, "m must be > 0"),
    ({"m": -1}, "m must be > 0"),
    ({"groups": ["0"]}, "groups must be a dict"),
])
def test_owl_bad_arguments(mlp, kwargs, match):
    layers = find_prunable_layers(mlp)
    with pytest.raises((ValueError, TypeError), match=match):
        owl_sparsities(mlp, layers, calib_for(12), 0.5, **kwargs)


@pytest.mark.parametrize("fn", [owl_sparsities, search_sparsities])
@pytest.mark.parametrize("sparsity", [1.0, -0.1, True, "0.5"])
def test_bad_sparsity(mlp, fn, sparsity):
    with pytest.raises(ValueError, match="sparsity must be a float in"):
        fn(mlp, find_prunable_layers(mlp), calib_for(12), sparsity)


@pytest.mark.parametrize("fn", [owl_sparsities, search_sparsities])
def test_missing_calib_and_layers(mlp, fn):
    layers = find_prunable_layers(mlp)
    with pytest.raises(ValueError, match="calib is None"):
        fn(mlp, layers, None, 0.5)
    with pytest.raises(ValueError, match="layers must be a non-empty dict"):
        fn(mlp, {}, calib_for(12), 0.5)
    with pytest.raises(TypeError, match="model must be"):
        fn("model", layers, calib_for(12), 0.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"levels": [0.6, 0.8]}, "must bracket"),
    ({"levels": [0.2, 1.0]}, "each of levels must be"),
    ({"levels": 0.5}, "levels must be a sequence"),
    ({"max_batches": 0}, "max_batches must be a positive int"),
    ({"structure": "2:4"}, "fixes every layer's sparsity"),
    ({"criterion": "nope"}, "unknown criterion"),
])
def test_search_bad_arguments(mlp, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        search_sparsities(mlp, find_prunable_layers(mlp), calib_for(12), 0.5, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"allocation": "best"}, "unknown allocation 'best'"),
    ({"allocation": None}, "unknown allocation None"),
    ({"allocation": "owl", "calib": None}, "needs calibration data"),
    ({"allocation": "search", "scope": "global"}, "needs scope='layer'"),
    ({"allocation": "owl", "overrides": {"2": 0.3}}, r"overrides set \['2'\]"),
])
def test_prune_allocation_errors(mlp, untouched, kwargs, match):
    check = untouched(mlp)
    args = {"sparsity": 0.5, "calib": calib_for(12), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune(mlp, **args)
    check()


def test_prune_allocation_with_nm_raises():
    with pytest.raises(ValueError, match="not N:M"):
        prune(nn.Sequential(nn.Linear(8, 8)), structure="2:4", allocation="owl",
              calib=[torch.randn(2, 8)])


# --- prune(allocation=...) ------------------------------------------------------------------


def test_prune_owl_matches_owl_sparsities():
    model = outlier_mlp("2")
    calib = calib_for(16)
    want = owl_sparsities(model, find_prunable_layers(model), calib, 0.5)
    assert len(set(want.values())) > 1
    pruner = prune(model, 0.5, "wanda", calib=calib, allocation="owl", progress=False)
    for name, mask in pruner.masks.items():
        assert int((~mask).sum()) == round(want[name] * mask.numel())
    assert pruner.state_dict()["settings"]["allocation"] == "owl"


def test_prune_allocation_skips_and_state(mlp):
    calib = calib_for(12)
    ref = copy.deepcopy(mlp)
    pruner = prune(mlp, 0.5, calib=calib, allocation="search", overrides={"4": None},
                   progress=False)
    assert list(pruner.masks) == ["0", "2"]
    layers = {n: m for n, m in find_prunable_layers(ref).items() if n != "4"}
    removed = sum(int((~m).sum()) for m in pruner.masks.values())
    assert abs(removed - 0.5 * sum(m.weight.numel() for m in layers.values())) <= 1
    # Settings travel: a uniform run's state does not load into a search run, and vice versa.
    uniform = prune(ref, 0.5, overrides={"4": None}, progress=False)
    with pytest.raises(ValueError, match="allocation"):
        pruner.load_state_dict(uniform.state_dict())
    assert "allocation" not in uniform.state_dict()["settings"]


@pytest.mark.parametrize("allocation", ["search", "owl"])
def test_allocation_refuses_calibration_without_rows(mlp, untouched, allocation):
    check = untouched(mlp)
    with pytest.raises(ValueError, match="no calibration data reached"):
        prune(mlp, 0.5, allocation=allocation, calib=[torch.randn(0, 12)], progress=False)
    check()


def test_search_refuses_all_padding_and_skips_empty_batches(mlp):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 4)

        def forward(self, x, attention_mask):
            return self.lin(x)

    model = Tokens()
    padding = {"x": torch.randn(2, 3, 12), "attention_mask": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="no calibration data reached the model's output"):
        search_sparsities(model, find_prunable_layers(model), [padding], 0.5, criterion="magnitude")
    layers = find_prunable_layers(mlp)
    got = search_sparsities(mlp, layers, [torch.randn(0, 12), *calib_for(12)], 0.5, criterion="magnitude")
    assert weighted_mean(got, layers) == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [owl_sparsities, search_sparsities])
def test_weight_norm_layer_is_refused_not_misread(mlp, fn):
    torch.nn.utils.parametrizations.weight_norm(mlp[2])
    with pytest.raises(ValueError, match="layer '2' has a parametrization on `weight` that is not sparsenet's"):
        fn(mlp, {"0": mlp[0], "2": mlp[2]}, calib_for(12), 0.5)
