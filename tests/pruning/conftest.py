"""Small models shared by the pruning tests (kept tiny so the whole suite runs in seconds)."""

import pytest
import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU())
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        return self.classifier(self.head(self.features(x)))


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet()


@pytest.fixture
def attnnet():
    torch.manual_seed(0)
    return AttnNet()



@pytest.fixture
def untouched():
    """``check = untouched(model)`` snapshots; ``check()`` asserts the model is as it was then:
    same state, no parametrizations, no hooks, no ``.grad``, same training/requires_grad flags."""
    from torch.nn.utils import parametrize

    def module_flags(model):
        return [
            (m.training, len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()
        ]

    def snapshot(model):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        flags = module_flags(model)
        grads = [p.requires_grad for p in model.parameters()]

        def check():
            after = model.state_dict()
            assert after.keys() == state.keys()
            assert all(torch.equal(after[k], v) for k, v in state.items())
            assert not any(parametrize.is_parametrized(m) for m in model.modules())
            assert module_flags(model) == flags
            assert [p.requires_grad for p in model.parameters()] == grads
            assert all(p.grad is None for p in model.parameters())

        return check

    return snapshot
