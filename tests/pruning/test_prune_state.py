"""Pruner.state_dict() / load_state_dict(): resume a gradual run exactly where it stopped."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenet.pruning import CubicSchedule, LinearSchedule, prune
from sparsenet.pruning.pruner import PRUNER_STATE_VERSION


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def schedule(soft=False):
    return CubicSchedule(start=0, end=8, frequency=2, initial=0.1, soft=soft)


def train(model, pruner, steps, first):
    # Plain SGD (no optimizer state) and data fixed by the step number, so two runs that are at
    # the same step do the same thing.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(first, first + steps):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("soft", [False, True])
def test_resume_matches_an_uninterrupted_run(soft):
    full = make_model()
    full_pruner = prune(full, 0.8, scope="global", schedule=schedule(soft), progress=False)
    train(full, full_pruner, 10, 0)

    first = make_model()
    pruner = prune(first, 0.8, scope="global", schedule=schedule(soft), progress=False)
    train(first, pruner, 5, 0)
    model_state, pruner_state = roundtrip(first.state_dict()), roundtrip(pruner.state_dict())
    assert pruner_state["format_version"] == PRUNER_STATE_VERSION and pruner_state["step"] == 5

    resumed = make_model()
    again = prune(resumed, 0.8, scope="global", schedule=schedule(soft), progress=False)
    resumed.load_state_dict(model_state)  # the masks travel with the model
    again.load_state_dict(pruner_state)
    assert again.step_count == 5 and again.target == pytest.approx(pruner.target)
    train(resumed, again, 5, 5)
    for name, mask in again.masks.items():
        assert torch.equal(mask, full_pruner.masks[name])
    for a, b in zip(resumed.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_refuses_newer_version_other_settings_and_missing_model_state():
    model = make_model()
    pruner = prune(model, 0.8, schedule=schedule(), progress=False)
    pruner.step(), pruner.step()
    state = pruner.state_dict()

    fresh = make_model()
    other = prune(fresh, 0.8, schedule=schedule(), progress=False)
    with pytest.raises(ValueError, match="newer than this sparsenet reads"):
        other.load_state_dict({**state, "format_version": PRUNER_STATE_VERSION + 1})
    with pytest.raises(ValueError, match="bad Pruner state format version 0"):
        other.load_state_dict({**state, "format_version": 0})
    with pytest.raises(ValueError, match="no format_version"):
        other.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="load the model's state_dict"):
        other.load_state_dict(state)  # model state (the masks) not loaded
    assert other.step_count == 0

    mismatched = prune(make_model(), 0.7, schedule=schedule(), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(sparsity\)"):
        mismatched.load_state_dict(state)
    linear = prune(make_model(), 0.8, schedule=LinearSchedule(0, 8, 2, 0.1), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(schedule\)"):
        linear.load_state_dict(state)

    pruner.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.load_state_dict(state)


@pytest.mark.parametrize("edit, error, match", [
    (lambda s: [s], TypeError, "must be the dict Pruner.state_dict"),
    (lambda s: None, TypeError, "must be the dict Pruner.state_dict"),
    (lambda s: {"format_version": PRUNER_STATE_VERSION}, ValueError,
     r"lacks \['step', 'finalized', 'settings', 'kept'\]"),
    (lambda s: {k: v for k, v in s.items() if k != "settings"}, ValueError, r"lacks \['settings'\]"),
    (lambda s: {**s, "settings": ["sparsity"]}, TypeError, "settings is list, not dict"),
    (lambda s: {**s, "kept": None}, TypeError, "kept is NoneType, not dict"),
    (lambda s: {**s, "finalized": "no"}, TypeError, "finalized is str, not bool"),
    (lambda s: {**s, "step": True}, TypeError, "step is bool, not int"),
    (lambda s: {**s, "step": -1}, ValueError, "step in Pruner state must be an int >= 0"),
    (lambda s: {**s, "settings": {**s["settings"], 1: 2}}, ValueError, r"other settings \(1\)"),
], ids=["list", "none", "only_version", "no_settings", "settings_list", "kept_none", "finalized_str",
        "step_bool", "step_negative", "settings_int_key"])
def test_malformed_state_is_refused_and_changes_nothing(edit, error, match):
    model = make_model()
    pruner = prune(model, 0.8, schedule=schedule(), progress=False)
    pruner.step(), pruner.step()
    state = pruner.state_dict()
    with pytest.raises(error, match=match):
        pruner.load_state_dict(edit(state))
    assert pruner.step_count == 2 and pruner.state_dict() == state
