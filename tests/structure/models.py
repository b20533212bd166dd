"""Small models for the structure tests: every coupling the dependency graph must see."""
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 24), nn.Linear(24, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvFlatten(nn.Module):
    """Conv -> BN -> ReLU -> flatten into a Linear: each channel is 4x4 = 16 of its inputs."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Residual(nn.Module):
    """Two blocks adding into one stream: the stem and both blocks' last convs are one group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.a2(torch.relu(self.a1(h)))
        h = h + self.b2(torch.relu(self.b1(h)))
        return self.head(h.mean(dim=(2, 3)))


class DenseBlock(nn.Module):
    """DenseNet-style: each conv reads the concat of everything before it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 4, 3, padding=1)
        self.c2 = nn.Conv2d(10, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(15)
        self.head = nn.Linear(15, 3)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        a = torch.cat([s, torch.relu(self.c1(s))], dim=1)
        b = torch.cat([a, torch.relu(self.c2(a))], dim=1)
        return self.head(torch.relu(self.bn(b)).mean(dim=(2, 3)))


class Depthwise(nn.Module):
    """An inverted residual: expand 1x1, depthwise 3x3 (one group with the expansion), project."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.expand(x))))))
        return self.head((x + self.project(h)).mean(dim=(2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.g(torch.relu(self.a(x))).mean(dim=(2, 3)))


class Split(nn.Module):
    """One layer's outputs chunked in two, each half used separately (GLU-style)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * torch.sigmoid(b))


def inputs(model: nn.Module, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if isinstance(model, (MLP,)):
        return torch.randn(batch, 12, generator=g)
    if isinstance(model, Split):
        return torch.randn(batch, 6, generator=g)
    channels = 4 if isinstance(model, Depthwise) else 3
    return torch.randn(batch, channels, 4, 4, generator=g)
