"""``sparsenet reconstruct``, run in-process: outputs, structures, --sparsify, option and runtime errors.

Modeled on test_cli_prune.py: the factories live in this module and are passed as
``f"{__name__}:factory"`` (pytest's import name for this file, already in ``sys.modules``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsenet
from sparsenet import cli
from sparsenet.nn import SparseLinear


def mlp_factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


MLP = f"{__name__}:mlp_factory"
# Few block-fit epochs keep the file fast; the solvers themselves do most of the work.
FAST = ["--epochs", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    code = cli.main(["reconstruct", "--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def calib_inputs():
    torch.manual_seed(1)
    return torch.randn(64, 16)


@pytest.fixture
def calib(tmp_path, calib_inputs):
    path = tmp_path / "calib.safetensors"
    save_file({"inputs": calib_inputs}, str(path))
    return path


def relative_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = dense(x)
        return float((model(x) - ref).norm() / ref.norm())


def test_end_to_end_beats_magnitude(tmp_path, calib, calib_inputs, capsys):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", MLP, "--calib", calib, "--calib-batch", "16", "--sparsity", "0.5",
                             "-o", out], capsys)
    assert code == 0, err
    assert "reconstruction: 3 layers" in stdout and "admm" in stdout
    assert f"saved {out}" in stdout
    model = sparsenet.load(out, mlp_factory())
    for m in model:
        if isinstance(m, nn.Linear):
            assert int((m.weight == 0).sum()) == m.weight.numel() // 2, m
            # Finalized: plain weights, no mask parametrizations left behind.
            assert not hasattr(m, "parametrizations")
    dense = mlp_factory()
    magnitude = sparsenet.prune(copy.deepcopy(dense), 0.5, progress=False).finalize()
    for x in (calib_inputs, torch.randn(64, 16)):  # calibration rows and fresh ones
        assert relative_error(model, dense, x) < relative_error(magnitude, dense, x)


@pytest.mark.parametrize("extra", [
    ["--structure", "2:4"],
    ["--structure", "2:4", "--method", "sparsegpt", "--no-blockwise", "--no-correct"],
])
def test_two_four(tmp_path, calib, capsys, extra):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", MLP, "--calib", calib, *extra, *([] if "--no-blockwise" in extra else FAST),
                             "-o", out], capsys)
    assert code == 0, err
    model = sparsenet.load(out, mlp_factory())
    for m in model:
        if isinstance(m, nn.Linear):
            assert (m.weight.reshape(-1, 4) != 0).sum(1).le(2).all(), m
            assert float((m.weight == 0).float().mean()) == 0.5, m


def test_sparsify_and_exclude(tmp_path, calib, capsys):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", MLP, "--calib", calib, "--sparsity", "0.75", "--method", "lsq",
                             "--exclude", "4", "--sparsify", *FAST, "-o", out], capsys)
    assert code == 0, err
    assert "sparsify" in stdout
    skeleton, _ = sparsenet.sparsify(sparsenet.prune(mlp_factory(), 0.75, exclude=["4"], progress=False).finalize())
    model = sparsenet.load(out, skeleton)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert model[0].density == pytest.approx(0.25) and model[2].density == pytest.approx(0.25)
    assert isinstance(model[4], nn.Linear) and int((model[4].weight == 0).sum()) == 0


def test_help_lists_the_options(capsys):
    assert cli.main(["reconstruct", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--weights", "--trust-pickle", "--calib", "--calib-batch", "--sparsity",
                   "--structure", "--block", "--method", "--allocation", "--no-blockwise", "--no-correct",
                   "--final", "--epochs", "--lr", "--exclude", "--blocks", "--output", "--sparsify", "--min-sparsity",
                   "--format", "--no-progress", "sparsegpt,admm,lsq", "uniform,owl,search", "TorchScript"):
        assert option in out, option
    assert cli.main(["--help"]) == 0
    assert "reconstruct" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "0.5"], "the following arguments are required: --calib"),
    (["--calib", "c.safetensors"], "--sparsity is required for --structure unstructured"),
    (["--calib", "c.safetensors", "--structure", "2:4", "--sparsity", "0.9"], "fixes the sparsity at 0.5"),
    (["--calib", "c.safetensors", "--sparsity", "0.5", "--method", "obs"], "argument --method: invalid choice"),
    (["--calib", "c.safetensors", "--structure", "2:4", "--allocation", "owl"], "cannot vary the fixed sparsity"),
    (["--calib", "c.safetensors", "--structure", "channel", "--sparsity", "0.5", "--method", "sparsegpt"],
     "--structure channel needs --method lsq or admm"),
    (["--calib", "c.safetensors", "--sparsity", "0.5", "--no-blockwise", "--epochs", "3"],
     "which --no-blockwise turns off"),
    (["--calib", "c.safetensors", "--sparsity", "0.5", "--lr", "0"], "argument --lr: must be a positive number"),
    (["--calib", "c.safetensors", "--sparsity", "0.5", "--min-sparsity", "0.3"],
     "--min-sparsity applies only with --sparsify"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", MLP, *argv, "-o", out], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


# torch >= 2.10 deprecates TorchScript; the CLI still recognises the files people have.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_refused(tmp_path, calib, capsys):
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(mlp_factory()), str(path))
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", path, "--calib", calib, "--sparsity", "0.5", "-o", out], capsys)
    assert code == 1 and "TorchScript" in err and "hooks" in err, err
    assert not out.exists()


def test_runtime_errors_exit_1(tmp_path, calib, capsys):
    out = tmp_path / "out.safetensors"
    nan = tmp_path / "nan.safetensors"
    bad = torch.randn(16, 16)
    bad[3, 5] = float("nan")
    save_file({"inputs": bad}, str(nan))
    cases = [
        (["--calib", nan, "--sparsity", "0.5"], "NaN"),
        (["--calib", tmp_path / "missing.safetensors", "--sparsity", "0.5"], "no such file"),
        (["--calib", calib, "--sparsity", "0.5", "--exclude", "nothing_like_this"], "exclude patterns match no module"),
        (["--calib", calib, "--sparsity", "0.5", "--blocks", "no_such_block"], "not modules of the model"),
        (["--calib", calib, "--sparsity", "0.5", "-o", tmp_path / "nowhere" / "o.safetensors"], "does not exist"),
    ]
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({"inputs": torch.randn(8, 5)}, str(wrong_shape))
    cases.append((["--calib", wrong_shape, "--sparsity", "0.5"], "does not run through the model"))
    for argv, message in cases:
        if "-o" not in argv:
            argv = [*argv, "-o", out]
        code, _, err = run(["--model", MLP, *argv], capsys)
        assert code == 1 and message in err and err.startswith("sparsenet reconstruct: error:"), (argv, err)
        assert err.count("\n") == 1, err  # one line, no traceback
    assert not out.exists()


def test_help_defaults_are_the_library_defaults():
    # --help states them without importing torch; the command passes only what was given.
    import inspect

    params = inspect.signature(sparsenet.reconstruct).parameters
    assert (params["epochs"].default, params["lr"].default) == (cli.REC_EPOCHS, cli.REC_LR)


def raises_in_factory():
    raise KeyError("no weights here")


@pytest.mark.parametrize("model, output, message", [
    ("builtins:exit", "out.sn", "the factory called exit()"),
    (f"{__name__}:raises_in_factory", "out.sn", "the factory raised KeyError: 'no weights here'"),
    (".mod:make", "out.sn", "is neither a file nor pkg.module:factory"),
    (MLP, ".", "it is a directory, not a regular file"),
])
def test_model_and_output_failures_are_one_error_line(tmp_path, calib, capsys, model, output, message):
    code, _, err = run(["--model", model, "--calib", calib, "--sparsity", "0.5", "-o", tmp_path / output], capsys)
    assert code == 1 and err.startswith("sparsenet reconstruct: error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
