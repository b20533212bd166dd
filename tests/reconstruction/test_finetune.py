"""Masked fine-tuning: recovers a 90%-pruned digits MLP, keeps masks and zeros, distils, errors."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.pruning import find_weight_mask
from sparsenet.calibration.outputs import model_output as output_tensor
from sparsenet.reconstruction.finetune import FinetuneResult, finetune


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(standardized_digits):
    return standardized_digits


@pytest.fixture(scope="module")
def dense_mlp(digits):
    """A 64-64-10 MLP trained briefly on digits (shared; tests deep-copy it)."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def loader(x, y=None, batch=64):
    if y is None:
        return [x[i:i + batch] for i in range(0, len(x), batch)]
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def pruned_copy(model, sparsity=0.9):
    pruned = copy.deepcopy(model)
    sparsenet.prune(pruned, sparsity, progress=False)
    return pruned


def masks_of(model):
    return {n: find_weight_mask(m).mask for n, m in model.named_modules() if find_weight_mask(m) is not None}


def assert_pruned_zero(model, masks):
    for name, mask in masks.items():
        assert not model.get_submodule(name).weight[~mask].any(), name


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_finetune_recovers_accuracy_and_keeps_masks(digits, dense_mlp, weight_decay):
    xtr, ytr, xte, yte = digits
    pruned = pruned_copy(dense_mlp)
    masks = masks_of(pruned)
    saved = {n: m.clone() for n, m in masks.items()}
    before = accuracy(pruned, xte, yte)
    assert before < accuracy(dense_mlp, xte, yte) - 0.05  # 90% one-shot really hurts

    result = finetune(pruned, loader(xtr, ytr), epochs=4, lr=3e-3, weight_decay=weight_decay,
                      progress=False, seed=0)
    after = accuracy(pruned, xte, yte)
    assert after > before + 0.05
    assert isinstance(result, FinetuneResult)
    assert result.steps == 4 * len(loader(xtr, ytr)) and len(result.epoch_losses) == 4
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    # Same mask objects, same contents, pruned positions exactly zero.
    now = masks_of(pruned)
    assert all(now[n] is masks[n] and torch.equal(masks[n], saved[n]) for n in masks)
    assert_pruned_zero(pruned, masks)
    assert not pruned.training  # came in in eval mode, leaves in eval mode
    assert all(p.grad is None for p in pruned.parameters())


def test_max_steps_and_mode_restored(digits, dense_mlp):
    xtr, ytr, _, _ = digits
    pruned = pruned_copy(dense_mlp).train()
    pruned[1].eval()
    result = finetune(pruned, loader(xtr, ytr), epochs=3, max_steps=5, progress=False)
    assert result.steps == 5 and len(result.epoch_losses) == 1
    assert pruned.training and not pruned[1].training


def test_seed_makes_runs_repeat_and_leaves_global_rng(digits, dense_mlp):
    xtr, ytr, _, _ = digits
    model = nn.Sequential(copy.deepcopy(dense_mlp)[0], nn.Dropout(0.3), nn.ReLU(),
                          copy.deepcopy(dense_mlp)[2])
    sparsenet.prune(model, 0.5, progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    finetune(a, loader(xtr, ytr), max_steps=5, lr=1e-2, progress=False, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    finetune(b, loader(xtr, ytr), max_steps=5, lr=1e-2, progress=False, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_output_distillation_lowers_its_loss(digits, dense_mlp, kind):
    xtr, _, _, _ = digits
    pruned = pruned_copy(dense_mlp)
    masks = {n: m.clone() for n, m in masks_of(pruned).items()}
    teacher = copy.deepcopy(dense_mlp).train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    # No targets: the teacher is the only signal (alpha is 1).
    result = finetune(pruned, loader(xtr), epochs=5, lr=1e-2, teacher=teacher, distill_output=kind,
                      temperature=2.0, progress=False, seed=0)
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0]
    assert_pruned_zero(pruned, masks)
    assert all(torch.equal(masks[n], m) for n, m in masks_of(pruned).items())
    # The teacher is untouched and its flags are back.
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_state.items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_kl_distillation_with_targets_recovers_accuracy(digits, dense_mlp):
    xtr, ytr, xte, yte = digits
    pruned = pruned_copy(dense_mlp)
    before = accuracy(pruned, xte, yte)
    finetune(pruned, loader(xtr, ytr), epochs=3, lr=3e-3, teacher=copy.deepcopy(dense_mlp),
             distill_output="kl", alpha=0.5, temperature=4.0, progress=False, seed=0)
    assert accuracy(pruned, xte, yte) > before + 0.05


def test_feature_distillation_lowers_its_loss_and_removes_hooks(digits, dense_mlp):
    xtr, _, xte, _ = digits
    pruned = pruned_copy(dense_mlp)
    teacher = copy.deepcopy(dense_mlp)
    gap = lambda: F.mse_loss(pruned[:2](xte), teacher[:2](xte)).item()  # noqa: E731
    with torch.no_grad():
        before = gap()
    result = finetune(pruned, loader(xtr), epochs=5, lr=1e-2, teacher=teacher, feature_layers=["1"],
                      feature_weight=2.0, progress=False, seed=0)
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    with torch.no_grad():
        assert gap() < 0.8 * before  # held-out hidden features moved towards the teacher's
    assert not pruned[1]._forward_hooks and not teacher[1]._forward_hooks


def test_kl_value_matches_hand_computation():
    # One step at lr ~ 0 so the reported loss is the loss of the untouched model.
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 5), nn.Linear(4, 5)
    x = torch.randn(6, 4)
    with torch.no_grad():
        s, t = student(x) / 3.0, teacher(x) / 3.0
        p = t.softmax(-1)
        expected = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean() * 9.0
    result = finetune(student, [x], lr=1e-12, teacher=teacher, temperature=3.0, progress=False)
    assert result.epoch_losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_loss_fn_and_dict_batches_with_labels():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return SimpleNamespace(logits=self.fc(x))

    torch.manual_seed(0)
    model = Keyword()
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    data = [{"x": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 32, 8)]
    result = finetune(model, data, epochs=5, lr=1e-2, progress=False)  # cross-entropy on labels
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    seen = []

    def loss_fn(output, batch):
        seen.append(sorted(batch))  # the raw batch, labels included
        return output.logits.pow(2).mean()

    finetune(model, data, lr=1e-2, loss_fn=loss_fn, progress=False)
    assert seen[0] == ["labels", "x"] and len(seen) == 4


def test_torch_pruned_layers_keep_their_zeros(digits, dense_mlp):
    xtr, ytr, _, _ = digits
    model = copy.deepcopy(dense_mlp)
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.8)
    mask = model[0].weight_mask.clone()
    finetune(model, loader(xtr, ytr), max_steps=10, lr=1e-2, weight_decay=0.1, progress=False)
    with torch.no_grad():
        model(xtr[:1])  # refresh torch's cached weight
    assert torch.equal(model[0].weight_mask, mask)
    assert not model[0].weight[mask == 0].any()


def test_output_tensor_extraction():
    t = torch.ones(2)
    assert output_tensor(t) is t
    assert output_tensor(SimpleNamespace(logits=t)) is t
    assert output_tensor(SimpleNamespace(last_hidden_state=t)) is t
    assert output_tensor((t, torch.zeros(1))) is t
    with pytest.raises(TypeError, match="output tensor"):
        output_tensor({"a": t})


def test_nan_loss_stops_with_the_step_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).eval()
    calls = []

    def loss_fn(output, batch):
        calls.append(1)
        loss = output.pow(2).mean()
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(ValueError, match="step 3"):
        finetune(model, [torch.randn(4, 3)] * 5, lr=1e-2, loss_fn=loss_fn, progress=False)
    assert len(calls) == 3  # stopped there
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not model.training


def test_bad_inputs_are_rejected(digits, dense_mlp):
    xtr, ytr, _, _ = digits
    model = pruned_copy(dense_mlp)
    data = loader(xtr[:64], ytr[:64])
    with pytest.raises(ValueError, match="no targets"):
        finetune(model, loader(xtr[:64]), progress=False)
    with pytest.raises(ValueError, match="teacher is the model"):
        finetune(model, data, teacher=model)
    with pytest.raises(ValueError, match="shares parameters"):
        finetune(model, data, teacher=nn.Sequential(model[0]))
    with pytest.raises(ValueError, match=r"not in the model: \['nope'\]"):
        finetune(model, data, teacher=copy.deepcopy(dense_mlp), feature_layers=["nope"])
    with pytest.raises(ValueError, match=r"not in the teacher: \['2'\]"):
        finetune(model, data, teacher=nn.Sequential(nn.Linear(64, 10)), feature_layers=["2"])
    with pytest.raises(TypeError, match="feature_layers"):
        finetune(model, data, teacher=copy.deepcopy(dense_mlp), feature_layers="1")
    with pytest.raises(ValueError, match="need a teacher"):
        finetune(model, data, distill_output="kl")
    with pytest.raises(ValueError, match="distill_output"):
        finetune(model, data, teacher=copy.deepcopy(dense_mlp), distill_output="l1")
    with pytest.raises(ValueError, match="alpha"):
        finetune(model, data, alpha=1.5)
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, data, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        finetune(model, data, lr=0.0)
    with pytest.raises(ValueError, match="temperature"):
        finetune(model, data, temperature=0)
    with pytest.raises(TypeError, match="calib"):
        finetune(model, iter(data))
    with pytest.raises(TypeError, match="regrow"):
        finetune(model, data, regrow="rigl")
    with pytest.raises(TypeError, match="loss_fn"):
        finetune(model, data, loss_fn=3)
