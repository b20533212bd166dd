"""The ``sparsenet`` command: the quick demo end to end (in-process), the console script, option errors."""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsenet
from sparsenet import cli, demo

# Measured with --quick settings over seeds 0-7 at 90%: the sparse model ends between 0.9 points
# better and 1.8 points worse than the dense one. The bound leaves margin above the worst seed.
MAX_ACC_DROP = 0.03


@pytest.fixture(scope="module")
def quick_run():
    """One ``sparsenet demo --quick`` run: exit code, stdout and the dicts the demo returned."""
    results = {}

    def spy(name):
        real = getattr(demo, name)

        def wrapper(*args, **kwargs):
            results[name] = real(*args, **kwargs)
            return results[name]
        return wrapper

    out = io.StringIO()
    threads = torch.get_num_threads(), sparsenet.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setattr(demo, "run_digits", spy("run_digits"))
            mp.setattr(demo, "run_bench", spy("run_bench"))
            code = cli.main(["demo", "--quick", "--no-progress", "--threads", "1", "--batch", "1", "8"])
    finally:
        # --threads is process-wide: give the rest of the test session its threads back.
        torch.set_num_threads(threads[0])
        sparsenet.set_num_threads(threads[1])
    return code, out.getvalue(), results


def test_quick_demo_exits_zero(quick_run):
    code, out, _ = quick_run
    assert code == 0, out
    assert "outputs agree" in out


def test_sparse_accuracy_close_to_dense(quick_run):
    _, _, r = quick_run
    d = r["run_digits"]
    assert d["dense_acc"] > 0.9  # the MLP really learned digits
    assert d["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert d["sparse_acc"] >= d["dense_acc"] - MAX_ACC_DROP
    # The native kernels and the save -> load round trip change no prediction.
    assert d["sparse_acc"] == pytest.approx(d["finetuned_acc"], abs=1.5 / 450)
    assert d["reloaded_acc"] == d["sparse_acc"]
    assert d["logits_max_rel_err"] < 1e-5
    assert d["sparse_nonzeros"] < 0.2 * d["dense_params"]
    assert d["file_bytes"] < 0.3 * d["dense_bytes"]


def test_bench_results_and_table(quick_run):
    _, out, r = quick_run
    b = r["run_bench"]
    assert [(row["batch"], row["impl"]) for row in b["rows"]] == [
        (batch, impl) for batch in (1, 8) for impl in ("dense", "sparsenet", "torch.sparse")
    ]
    assert all(row["median_s"] > 0 for row in b["rows"])
    assert b["max_rel_err"] < 1e-5
    for word in ("dense", "sparsenet", "torch.sparse", "speedup", "sparsify"):
        assert word in out


def test_no_bench_skips_timing(capsys):
    assert cli.main(["demo", "--quick", "--no-bench", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "torch.sparse" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--sparsity", "1.0"], "argument --sparsity: must be a number in [0, 1), got '1.0'"),
        (["demo", "--sparsity", "-0.1"], "argument --sparsity: must be a number in [0, 1)"),
        (["demo", "--sparsity", "nan"], "argument --sparsity: must be a number in [0, 1)"),
        (["demo", "--sparsity", "lots"], "argument --sparsity: must be a number in [0, 1)"),
        (["demo", "--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
        (["demo", "--batch", "1", "x"], "argument --batch: must be an integer >= 1, got 'x'"),
        (["demo", "--hidden", "-4"], "argument --hidden: must be an integer >= 1"),
        (["demo", "--layers", "0"], "argument --layers: must be an integer >= 1"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_options_fail_clearly(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_info(tmp_path):
    # The script sits beside this interpreter in a venv, even one that was not activated.
    beside = Path(sys.executable).with_name("sparsenet")
    exe = str(beside) if beside.exists() else shutil.which("sparsenet")
    assert exe is not None, "the sparsenet console script is not installed"
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for key in ("sparsenet", "torch", "isa", "num_threads"):
        assert key in proc.stdout


def test_module_entry_point_help(tmp_path):
    # cwd away from the checkout: "-m" puts the current directory first on the import path, and the
    # source tree there has no compiled module unless the install is editable.
    proc = subprocess.run([sys.executable, "-m", "sparsenet.cli", "--help"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "info" in proc.stdout
