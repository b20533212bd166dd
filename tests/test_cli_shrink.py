"""``sparsenet shrink``, run in-process: a smaller model saved, its report, and errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsenet
from sparsenet import cli


def residual_factory() -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = h + self.b(torch.relu(self.a(h)))
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net().eval()


FACTORY = f"{__name__}:residual_factory"


def run(argv, capsys):
    code = cli.main(["shrink", "--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.safetensors"
    save_file({"inputs": torch.randn(24, 3, 6, 6, generator=torch.Generator().manual_seed(1))}, str(path))
    return path


def test_shrink_saves_a_smaller_model(tmp_path, calib, capsys):
    out = tmp_path / "small.safetensors"
    code, stdout, err = run(["--model", FACTORY, "--ratio", "0.5", "--calib", calib, "--calib-batch", "8",
                             "--round-to", "2", "-o", out], capsys)
    assert code == 0, err
    assert "groups shrunk" in stdout and "refit" in stdout and f"saved {out}" in stdout
    meta = sparsenet.io.read_metadata(out)
    assert meta["format"] == "sparsenet"
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        widths = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert widths["a.weight"][0] < 8 and widths["a.weight"][0] % 2 == 0  # a's filters were removed
    assert widths["b.weight"][1] == widths["a.weight"][0]  # and b reads only those left
    small = sparsenet.load(out, residual_factory())  # the plain model, rebuilt at the saved widths
    assert small.a.out_channels == widths["a.weight"][0]
    assert small(torch.randn(2, 3, 6, 6)).shape == (2, 4)


def test_group_bounds_reach_the_library(tmp_path, calib, capsys):
    out = tmp_path / "capped.sn"
    code, stdout, err = run(["--model", FACTORY, "--ratio", "0.3", "--calib", calib, "--max-ratio", "0.25",
                             "-o", out], capsys)
    assert code == 0, err
    small = sparsenet.load(out, residual_factory())
    assert small.a.out_channels >= 6 and small.stem.out_channels >= 6  # at most 25% of 8 from each group
    code, _, err = run(["--model", FACTORY, "--ratio", "0.4", "--calib", calib, "--max-ratio", "0.25",
                        "--scope", "layer", "-o", out], capsys)
    assert code == 1 and "need scope='global'" in err


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5"], "must be a number in [0, 1)"),
    (["--ratio", "0.5", "--min-ratio", "-1"], "must be a number in [0, 1)"),
    (["--ratio", "0.5", "--scope", "everywhere"], "invalid choice"),
])
def test_option_errors(tmp_path, calib, capsys, argv, message):
    code, _, err = run(["--model", FACTORY, "--calib", calib, "-o", tmp_path / "o.sn", *argv], capsys)
    assert code == 2 and message in err


def test_nothing_to_shrink_is_one_error_line(tmp_path, capsys):
    calib = tmp_path / "c.safetensors"
    save_file({"inputs": torch.randn(4, 3)}, str(calib))
    code, _, err = run(["--model", f"{__name__}:single_linear", "--ratio", "0.5", "--calib", calib,
                        "-o", tmp_path / "o.sn"], capsys)
    assert code == 1 and "nothing in the model can be shrunk" in err and "Traceback" not in err


def single_linear() -> nn.Module:
    return nn.Linear(3, 2)
