"""The calibration protocol (batch kinds, errors) and forward-hook input-norm capture."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsenet.calibration import capture_input_sq_norms, iter_batches, split_batch


class TokenNet(nn.Module):
    """Takes keyword arguments like a Hugging Face model: embeddings + attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 3)
        self.pool = nn.Linear(3, 2)  # sees one pooled row per sequence

    def forward(self, inputs_embeds, attention_mask):
        h = self.down(torch.relu(self.up(inputs_embeds)))
        return self.pool(h[:, 0])


def test_batch_kinds():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert split_batch(x)[:3] == ((x,), {}, None)
    args, kwargs, targets, raw = split_batch((x, y))
    assert args == (x,) and kwargs == {} and targets is y and raw[0] is x
    assert split_batch([x]).targets is None  # TensorDataset of inputs only
    b = split_batch({"input_ids": x, "labels": y})
    assert b.args == () and list(b.kwargs) == ["input_ids"] and b.targets is y
    b = split_batch(({"input_ids": x}, y))
    assert b.kwargs == {"input_ids": x} and b.targets is y


def test_dataloader_is_re_iterable():
    loader = DataLoader(TensorDataset(torch.randn(6, 3), torch.arange(6)), batch_size=4)
    for _ in range(2):
        sizes = [b.args[0].shape[0] for b in iter_batches(loader)]
        assert sizes == [4, 2]


@pytest.mark.parametrize(
    "calib, error, match",
    [
        ([], ValueError, "calib is empty"),
        (None, ValueError, "calib is None"),
        (torch.randn(3, 4), TypeError, "wrap a single batch in a list"),
        ((b for b in [torch.randn(3, 4)]), TypeError, "re-iterable"),
        ([torch.tensor([[1.0, float("nan"), 0, 0]])], ValueError, "batch #0 contains NaN or Inf"),
        ([torch.randn(1, 4), torch.full((1, 4), float("inf"))], ValueError, "#1 contains NaN"),
        (["text"], TypeError, "unsupported calibration batch #0 of type str"),
        ([(torch.randn(1, 4),) * 3], TypeError, "unsupported calibration batch"),
        ([{"labels": torch.zeros(1)}], ValueError, "no model inputs"),
    ],
)
def test_bad_calib(calib, error, match):
    with pytest.raises(error, match=match):
        list(iter_batches(calib))


def test_linear_norms_equal_reference_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    xs = [torch.randn(3, 4), torch.randn(2, 7, 4)]  # any leading dims count as tokens
    got = capture_input_sq_norms(model, {"0": model[0], "2": model[2]}, xs)
    flat = torch.cat([x.reshape(-1, 4) for x in xs])
    torch.testing.assert_close(got["0"], flat.pow(2).sum(0))
    torch.testing.assert_close(got["2"], torch.relu(model[0](flat)).pow(2).sum(0))


def test_padding_tokens_are_excluded(untouched):
    torch.manual_seed(0)
    model = TokenNet()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    emb = torch.randn(2, 5, 4)
    noisy = emb.clone()
    noisy[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), 4)
    layers = {"up": model.up, "down": model.down, "pool": model.pool}
    check = untouched(model)
    a = capture_input_sq_norms(model, layers, [{"inputs_embeds": emb, "attention_mask": mask}])
    b = capture_input_sq_norms(model, layers, [{"inputs_embeds": noisy, "attention_mask": mask}])
    check()
    for name in layers:
        torch.testing.assert_close(a[name], b[name])
    torch.testing.assert_close(a["up"], emb[mask == 1].pow(2).sum(0))
    # The pooled input (batch, features) does not line up with the mask: every row counts.
    h = model.down(torch.relu(model.up(emb)))[:, 0]
    torch.testing.assert_close(a["pool"], h.pow(2).sum(0))


def test_conv_norms_per_input_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    got = capture_input_sq_norms(model, {"0": model[0]}, [x])
    torch.testing.assert_close(got["0"], x.pow(2).sum((0, 2, 3)))


def test_hooks_removed_and_mode_restored_when_a_batch_fails(untouched):
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    check = untouched(model)  # training mode
    with pytest.raises(RuntimeError):
        capture_input_sq_norms(model, {"0": model[0]}, [torch.randn(2, 4), torch.randn(2, 5)])
    check()
    model.eval()
    check = untouched(model)
    capture_input_sq_norms(model, {"0": model[0]}, [torch.randn(2, 4)])
    check()


def test_layer_never_reached_raises():
    model = nn.Sequential(nn.Linear(4, 3))
    stray = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"never reached layers \['stray'\]"):
        capture_input_sq_norms(model, {"0": model[0], "stray": stray}, [torch.randn(2, 4)])
