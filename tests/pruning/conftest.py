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
