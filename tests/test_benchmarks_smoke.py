"""The benchmark scripts stay runnable: a tiny speedup table end to end (speed is not checked here)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    """Import benchmarks/<name>.py under its own name (the scripts import each other that way)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def small_rotation(monkeypatch):
    common = load("common")
    monkeypatch.setattr(common, "MAX_COPIES", 3)
    yield common
    sys.modules.pop("common", None)
    sys.modules.pop("speedup_table", None)


def test_speedup_table_runs_and_checks_agreement(small_rotation, capsys):
    import torch

    threads = torch.get_num_threads()
    table = load("speedup_table")
    try:
        table.main(["--shapes", "40x70", "--sparsities", "0.9", "--batches", "1,5", "--rounds", "2", "--threads", "1"])
    finally:
        table.set_threads(threads)
    out = capsys.readouterr().out
    assert "outputs agree" in out and "40x70" in out and "limit" in out


def test_contenders_compute_the_same_layer(small_rotation):
    import torch

    c = small_rotation.make_contenders(33, 20, 0.7)
    assert small_rotation.check_agreement(c, torch.randn(4, 20)) < 1e-5
    fns = small_rotation.callables(c, torch.randn(3, 20))
    assert {k: tuple(f().shape) for k, f in fns.items()} == {k: (3, 33) for k in fns}


def test_pruning_pipeline_runs_on_a_tiny_model():
    pytest.importorskip("transformers")
    pipeline = load("pruning_pipeline")
    try:
        code = pipeline.main(["--layers", "1", "--hidden", "32", "--ffn", "64", "--heads", "2", "--seqs", "2",
                              "--seq-len", "8", "--calib-batch", "1", "--criteria", "wanda"])
    finally:
        sys.modules.pop("pruning_pipeline", None)
    assert code in (0, None)


def test_shrink_bert_benchmark_runs_on_a_tiny_encoder(monkeypatch, capsys):
    import torch

    threads = torch.get_num_threads()
    sys.path.insert(0, str(BENCH))  # it imports memory.py and ab_native.py as the script would
    try:
        bench = load("shrink_bert")
        monkeypatch.setattr(sys, "argv", ["shrink_bert.py", "--layers", "1", "--hidden", "32", "--ffn", "64",
                                          "--heads", "4", "--sequences", "8", "--tokens", "8", "--rounds", "1",
                                          "--threads", "1"])
        bench.main()
    finally:
        sys.path.remove(str(BENCH))
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "encoder-layer parameters" in out and "speedup" in out and "batch 32" in out


def test_formats_table_runs_block_and_nm_weights(small_rotation, capsys):
    import torch

    threads = torch.get_num_threads()
    table = load("formats_table")
    try:
        for structure in (["--block", "16x16"], ["--nm", "2:4"]):
            table.main(["--shapes", "48x64", "--sparsities", "0.5", "--batches", "1,5", "--rounds", "1", "--threads", "1",
                        *structure])
    finally:
        table.set_threads(threads)
    out = capsys.readouterr().out
    assert "bsr vs dense" in out and "nm vs dense" in out and "48x64" in out


def test_conv_table_runs_and_checks_agreement(capsys):
    import torch

    threads = torch.get_num_threads()
    table = load("conv_table")
    try:
        table.main(["--set", "resnet", "--sparsities", "0.9", "--batches", "1", "--rounds", "1", "--threads", "1"])
    finally:
        table.set_threads(threads)
        sys.modules.pop("common", None)
    out = capsys.readouterr().out
    assert "512->512, 3x3, s1, 7x7" in out and "median speedup" in out


def test_conv_table_runs_on_blocks_of_output_channels(capsys):
    import torch

    threads = torch.get_num_threads()
    table = load("conv_table")
    try:  # (each cell checks the sparse output against dense before timing it)
        table.main(["--set", "resnet", "--sparsities", "0.9", "--batches", "1", "--rounds", "1", "--threads", "1",
                    "--block-rows", "4"])
    finally:
        table.set_threads(threads)
    out = capsys.readouterr().out
    assert "blocks of 4 output channels" in out and "512->512, 3x3" in out


def test_conv_blocks_quality_runs(capsys):
    pytest.importorskip("sklearn")
    load("conv_blocks_quality").main(["--sparsities", "0.8", "--seeds", "1", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "| blocks 4x1 | 80% |" in out and "| unstructured | 80% |" in out
