"""Gradual pruning: schedule curves, Pruner.step(), the soft variant, bad input."""

import pytest
import torch
from torch import nn

import sparsenet
from sparsenet.pruning import CubicSchedule, CustomSchedule, LinearSchedule, PruningStep, prune


def pruned_counts(pruner):
    return {name: int((~mask).sum()) for name, mask in pruner.masks.items()}


def test_cubic_matches_zhu_gupta_at_update_steps_and_holds_between():
    s = CubicSchedule(start=10, end=40, frequency=10, initial=0.2)
    want = {t: 0.9 + (0.2 - 0.9) * (1 - (t - 10) / 30) ** 3 for t in (10, 20, 30)}
    assert s.sparsity_at(0, 0.9) == 0.2  # before start
    for t, v in want.items():
        assert s.sparsity_at(t, 0.9) == pytest.approx(v)
        assert s.sparsity_at(t + 9, 0.9) == pytest.approx(v)  # held until the next update
    assert s.sparsity_at(40, 0.9) == s.sparsity_at(1000, 0.9) == 0.9
    assert [t for t in range(50) if s.is_update(t)] == [10, 20, 30, 40]


def test_linear_and_custom_and_end_off_the_frequency_grid():
    lin = LinearSchedule(start=0, end=10, frequency=4)
    assert [t for t in range(15) if lin.is_update(t)] == [0, 4, 8, 10]
    assert lin.sparsity_at(5, 0.8) == pytest.approx(0.8 * 4 / 10)
    custom = CustomSchedule(lambda t: 0.01 * t, end=50, frequency=5)
    assert custom.sparsity_at(17, 0.9) == pytest.approx(0.15)
    assert custom.sparsity_at(50, 0.9) == 0.9


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CubicSchedule(start=5, end=5), "end .* must be after start"),
        (lambda: CubicSchedule(start=5, end=2), "end .* must be after start"),
        (lambda: CubicSchedule(start=0, end=10, frequency=0), "frequency must be an int >= 1"),
        (lambda: CubicSchedule(start=0, end=10, frequency=1.5), "frequency"),
        (lambda: CubicSchedule(start=-1, end=10), "start must be an int >= 0"),
        (lambda: CubicSchedule(start=0, end=10, initial=1.0), r"initial must be .* \[0, 1\)"),
        (lambda: LinearSchedule(start=0, end=10, shrink=1.0), r"shrink must be .* \(0, 1\)"),
        (lambda: LinearSchedule(start=0, end=10, soft=1), "soft must be True or False"),
        (lambda: CustomSchedule(0.5, end=10), "callable"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity must be a float in \[0, 1\)"),
        ({"sparsity": 0.3}, "initial sparsity 0.5 is above the final sparsity 0.3"),
        ({"sparsity": None, "structure": "2:4"}, "fixes its sparsity"),
        ({"sparsity": 0.9, "criterion": "wanda"}, "needs calibration data"),
    ],
)
def test_bad_prune_with_schedule_leaves_model_untouched(mlp, untouched, kwargs, match):
    check = untouched(mlp)
    sched = CubicSchedule(start=0, end=10, initial=0.5)
    with pytest.raises(ValueError, match=match):
        prune(mlp, schedule=sched, progress=False, **kwargs)
    check()


def test_schedule_must_be_a_schedule(mlp):
    with pytest.raises(TypeError, match="schedule must be"):
        prune(mlp, 0.5, schedule=lambda t: 0.5, progress=False)


def test_masks_start_at_initial_and_rise_to_final_nested(mlp):
    sched = CubicSchedule(start=0, end=6, frequency=2, initial=0.2)
    pruner = sparsenet.prune(mlp, sparsity=0.8, schedule=sched, progress=False)
    numel = {n: m.numel() for n, m in pruner.masks.items()}
    assert pruned_counts(pruner) == {n: round(0.2 * k) for n, k in numel.items()}
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for t in range(1, 9):
        # Train a little between steps: re-scoring must see the new weights.
        with torch.no_grad():
            for layer in pruner.layers.values():
                layer.parametrizations.weight.original.add_(0.05 * torch.randn_like(layer.weight))
        result = pruner.step()
        assert isinstance(result, PruningStep) and result.step == t == pruner.step_count
        target = sched.sparsity_at(t, 0.8)
        assert result.sparsity == pytest.approx(target)
        assert result.updated == (t in (2, 4, 6)) and result.final == (t >= 6)
        assert pruned_counts(pruner) == {n: round(target * k) for n, k in numel.items()}
        for name, mask in pruner.masks.items():
            assert not (mask & ~previous[name]).any()  # pruned weights stay pruned
            new = previous[name] & ~mask
            assert result.newly_pruned.get(name, 0) == int(new.sum())
            if new.any():  # magnitude: the newly pruned are the smallest of the survivors
                w = pruner.layers[name].parametrizations.weight.original.detach().abs()
                assert w[new].max() <= w[mask].min()
            previous[name] = mask.clone()
    assert pruner.target == 0.8


def test_global_scope_and_calibrated_criterion_rescore_each_step(mlp):
    calib = [torch.randn(8, 12) for _ in range(2)]
    sched = LinearSchedule(start=0, end=4, frequency=2)
    pruner = prune(mlp, 0.6, "wanda", "global", schedule=sched, calib=calib, progress=False)
    assert sum(pruned_counts(pruner).values()) == 0
    pruner.step(), pruner.step()
    assert sum(pruned_counts(pruner).values()) == round(0.3 * 211)
    pruner.step(), pruner.step()
    assert sum(pruned_counts(pruner).values()) == round(0.6 * 211)


def test_failed_step_changes_nothing(mlp):
    calls = []

    def flaky(layer, ctx):
        calls.append(layer.name)
        if len(calls) > 3:  # the first plan (3 layers) succeeds, the next one fails
            return layer.weight.abs() * float("nan")
        return layer.weight.abs()

    pruner = prune(mlp, 0.5, flaky, schedule=LinearSchedule(0, 2, initial=0.1), progress=False)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    with pytest.raises(ValueError, match="NaN"):
        pruner.step()
    assert pruner.step_count == 0
    assert all(torch.equal(m, masks[n]) for n, m in pruner.masks.items())


def test_custom_schedule_above_final_fails_before_changing(mlp):
    sched = CustomSchedule(lambda t: 0.1 if t == 0 else 0.95, end=4)
    pruner = prune(mlp, 0.5, schedule=sched, progress=False)
    before = pruned_counts(pruner)
    with pytest.raises(ValueError, match="above the final sparsity"):
        pruner.step()
    assert pruner.step_count == 0 and pruned_counts(pruner) == before


def test_step_without_schedule_or_after_finalize(mlp):
    with pytest.raises(RuntimeError, match="needs a schedule"):
        prune(mlp, 0.5, progress=False).step()
    pruner = prune(mlp, 0.5, schedule=CubicSchedule(0, 3), progress=False)
    pruner.finalize()
    with pytest.raises(RuntimeError, match="after finalize"):
        pruner.step()
    assert pruner.step_count == 0


def test_soft_shrinks_until_end_then_zeroes(mlp):
    sched = LinearSchedule(start=0, end=4, frequency=2, initial=0.25, soft=True, shrink=0.5)
    dense = {n: l.weight.detach().clone() for n, l in enumerate(mlp) if isinstance(l, nn.Linear)}
    pruner = prune(mlp, 0.75, schedule=sched, progress=False)
    assert sum(pruned_counts(pruner).values()) == 0  # nothing masked yet
    for name, layer in pruner.layers.items():
        w, d = layer.weight.detach(), dense[int(name)]
        shrunk = w != d
        assert int(shrunk.sum()) == round(0.25 * w.numel())
        torch.testing.assert_close(w[shrunk], 0.5 * d[shrunk])
        # The smallest weights were shrunk.
        assert d[shrunk].abs().max() <= d[~shrunk].abs().min()
    pruner.step()
    result = pruner.step()  # t=2: still soft
    assert result.updated and not result.newly_pruned
    assert result.shrunk == {n: round(0.5 * m.numel()) for n, m in pruner.masks.items()}
    assert sum(pruned_counts(pruner).values()) == 0
    pruner.step()
    result = pruner.step()  # t=4 = end: hard
    assert result.final and not result.shrunk
    counts = pruned_counts(pruner)
    assert counts == {n: round(0.75 * m.numel()) for n, m in pruner.masks.items()}
    assert result.newly_pruned == counts
    for name, layer in pruner.layers.items():
        assert torch.all(layer.weight[~pruner.masks[name]] == 0)


def test_soft_keeps_an_earlier_hard_mask(mlp):
    first = {n: m.clone() for n, m in prune(mlp, 0.3, progress=False).masks.items()}
    sched = LinearSchedule(start=0, end=2, initial=0.5, soft=True)
    pruner = prune(mlp, 0.8, schedule=sched, progress=False)
    assert all(torch.equal(m, first[n]) for n, m in pruner.masks.items())


def test_one_shot_state_is_step_zero(mlp):
    pruner = prune(mlp, 0.5, progress=False)
    assert pruner.schedule is None and pruner.target == 0.5 and pruner.step_count == 0
