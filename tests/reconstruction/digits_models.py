"""Small models trained on scikit-learn's bundled digits, for the reconstruction quality tests.

The transformer reads each 8x8 image as 8 tokens of 8 pixels through a Hugging Face
``BertModel`` built from a small config; the CNN and MLP read the image directly. Each trains in
a few seconds on two cores. Splits are fixed: train / calibration / held-out test, so
calibration never sees the test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_calib: Tensor
    y_calib: Tensor
    x_test: Tensor
    y_test: Tensor


def digits(seed: int = 0) -> Digits:
    # Imported here, not at collection: scikit-learn loads its own libgomp, which would fail
    # tests/ops/test_runtime.py's one-OpenMP-runtime check if it ran later in the process.
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (n, 8, 8) in [0, 1]
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    # 1197 train / 256 calibration / 344 test
    return Digits(x[:1197], y[:1197], x[1197:1453], y[1197:1453], x[1453:], y[1453:])


class DigitsBert(nn.Module):
    """8 tokens of 8 pixels -> linear embedding -> BertModel encoder -> mean pool -> classes."""

    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=8, type_vocab_size=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.embed = nn.Linear(8, hidden)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bert(inputs_embeds=self.embed(x)).last_hidden_state
        return self.classifier(h.mean(dim=1))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1) if x.dim() == 3 else x))


def train(model: nn.Module, data: Digits, epochs: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y_train), generator=gen).split(64):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def calib_batches(data: Digits, batch: int = 32) -> list[tuple[Tensor, Tensor]]:
    return list(zip(data.x_calib.split(batch), data.y_calib.split(batch)))


@torch.no_grad()
def evaluate(model: nn.Module, reference: nn.Module, data: Digits) -> tuple[float, float]:
    """(accuracy, mean 1 - cosine of the logits to the reference's) on the test split."""
    model.eval()
    reference.eval()
    out, ref = model(data.x_test), reference(data.x_test)
    acc = float((out.argmax(1) == data.y_test).float().mean())
    return acc, float((1 - F.cosine_similarity(out, ref, dim=1)).mean())
