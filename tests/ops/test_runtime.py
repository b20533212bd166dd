"""Run-time configuration: threads, ISA override, one OpenMP runtime shared with torch."""
import os
import subprocess
import tempfile
import sys

import pytest
import torch

import sparsenet
from sparsenet.ops import cuda
from sparsenet.ops.runtime import config, openmp_libraries


def test_config_reports_the_build():
    cfg = config()
    assert cfg["sparsenet"] == sparsenet.__version__
    assert cfg["isa"] in cfg["isa_available"] and "fallback" in cfg["isa_compiled"]
    assert cfg["num_threads"] == sparsenet.get_num_threads()
    assert cfg["cuda_built"] is cuda.available()
    assert ("sm_80" in cfg["cuda_architectures"]) is cuda.available()


def test_show_config_prints(capsys):
    sparsenet.show_config()
    out = capsys.readouterr().out
    assert "isa" in out and "num_threads" in out and "cuda_built" in out


def test_threads_setting_and_errors():
    before = sparsenet.get_num_threads()
    try:
        sparsenet.set_num_threads(1)
        assert sparsenet.get_num_threads() == 1
    finally:
        sparsenet.set_num_threads(before)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            sparsenet.set_num_threads(bad)


def test_thread_counts_beyond_the_cpus_are_refused():
    # 100000 threads made OpenMP's team start crash or exit the process; more than the CPUs the
    # process may run on only contend for them.
    before, usable = sparsenet.get_num_threads(), sparsenet.ops.runtime.usable_threads()
    assert 1 <= usable <= (os.cpu_count() or usable)
    for bad in (usable + 1, 100000, 2**70):
        with pytest.raises(ValueError, match="exceeds the .* CPUs"):
            sparsenet.set_num_threads(bad)
        with pytest.raises(ValueError, match="exceeds the .* CPUs"):
            sparsenet._C.set_num_threads(min(bad, 2**31 - 1))  # the native layer checks too
    assert sparsenet.get_num_threads() == before


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="reads the affinity mask")
def test_thread_count_from_torch_is_clamped_at_import():
    # (A modest excess: torch itself starts every thread it is asked for.)
    r = run_python("import os, torch; torch.set_num_threads(len(os.sched_getaffinity(0)) + 3); import sparsenet; "
                   "print(sparsenet.get_num_threads(), sparsenet.ops.runtime.usable_threads())")
    assert r.returncode == 0, r.stderr
    threads, usable = r.stdout.split()
    assert threads == usable


# A model saved and loaded in the parent, used there on two threads (so OpenMP's team exists), then
# by a fork-started DataLoader's workers: GNU OpenMP cannot start a team in a forked child, so a
# multi-threaded call there hung forever. The workers must run it single-threaded and agree.
FORK_SCRIPT = """
import os, sys, time, torch, sparsenet
from torch import nn
torch.manual_seed(0)
lin = nn.Linear(512, 512)
with torch.no_grad():
    lin.weight.mul_(torch.rand_like(lin.weight) < 0.3)
path = sys.argv[1]
sparsenet.save(sparsenet.sparsify(nn.Sequential(lin), format="csr")[0], path)
model = sparsenet.load(path, nn.Sequential(sparsenet.SparseLinear(512, 512)))
threads = min(2, sparsenet.ops.runtime.usable_threads())
sparsenet.set_num_threads(threads)
x = torch.randn(4, 64, 512)
with torch.inference_mode():
    expected = torch.stack([model(x[i]) for i in range(4)])
# A 32 MiB output: the parent's output cache holds one when the workers fork; theirs start empty.
wide = sparsenet.SparseLinear.from_dense(nn.Linear(8, 4096))
xw = torch.randn(2048, 8)
with torch.inference_mode():
    expected_wide, spare = wide(xw), wide(xw)
del spare
assert sparsenet._C.output_cache_bytes() >= 32 * 2**20

seen = []  # (per worker: each has its own copy)

class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        assert sparsenet.get_num_threads() == 1 and sparsenet._C.in_forked_child()
        try:
            sparsenet.set_num_threads(2)
        except RuntimeError as e:
            assert "forked" in str(e) and "spawn" in str(e)
        else:
            raise AssertionError("set_num_threads(2) in a forked child must refuse")
        sparsenet.set_num_threads(1)  # allowed: it is what the child runs with
        if not seen:  # this worker's first item: the parent's cached output is not the child's
            assert sparsenet._C.output_cache_bytes() == 0
            seen.append(i)
        with torch.inference_mode():
            y = wide(xw)  # the child's own output cache works: the second call reuses the first's
            address = y.data_ptr()
            assert sparsenet._C.output_cache_bytes() == 0
            del y
            y = wide(xw)
            assert y.data_ptr() == address and torch.equal(y, expected_wide)
            return model(x[i])

start = time.monotonic()
loader = torch.utils.data.DataLoader(Rows(), batch_size=None, num_workers=2, timeout=30,
                                     multiprocessing_context="fork")
got = torch.stack(list(loader))
assert torch.equal(got, expected), (got - expected).abs().max()
assert sparsenet.get_num_threads() == threads  # the parent keeps its own setting
print(f"ok {threads} {time.monotonic() - start:.1f}")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_started_dataloader_workers_do_not_hang(tmp_path):
    r = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tmp_path / "model.safetensors")],
                       capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok"), r.stdout
    assert float(r.stdout.split()[2]) < 20, r.stdout  # seconds, not the DataLoader's timeout


def test_isa_errors():
    with pytest.raises(ValueError, match="unknown ISA"):
        sparsenet.set_isa("neon")


def run_python(code, **env):
    # Run outside the checkout: "python -c" puts the current directory first on the import path,
    # and the source tree has no compiled module unless the install is editable.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, cwd=tempfile.gettempdir())


def test_isa_environment_override():
    r = run_python("import sparsenet; print(sparsenet.get_isa())", SPARSENET_ISA="fallback")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fallback"
    r = run_python("import sparsenet", SPARSENET_ISA="bogus")
    assert r.returncode != 0 and "SPARSENET_ISA='bogus'" in r.stderr


def test_default_threads_follow_torch():
    r = run_python("import torch; torch.set_num_threads(1); import sparsenet; print(sparsenet.get_num_threads())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_shared_with_torch():
    # torch and the native module must share one OpenMP runtime (one thread pool), not two. Checked
    # in a fresh process: other packages (scikit-learn) bring OpenMP runtimes of their own.
    code = ("import sparsenet, sparsenet._C; from sparsenet.ops.runtime import openmp_libraries; "
            "print(len(openmp_libraries()), openmp_libraries())")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1 "), r.stdout


@pytest.mark.parametrize("fmt,options", [("csr", {}), ("bitmap", {}), ("bsr", {"block": (4, 4)}), ("nm", {}), ("conv", {})])
def test_large_outputs_are_reused_and_every_value_written_again(fmt, options):
    # Outputs of 32 MiB and up come back from a cache of freed ones (csrc/cpu/output_pool.h). The
    # first output is filled with NaN before it is freed: the second call gets that very buffer, so
    # any value its kernel does not write shows.
    from torch import nn

    torch.manual_seed(0)
    if fmt == "conv":  # 8 x 64 x 128 x 128 floats: 32 MiB
        dense = nn.Conv2d(16, 64, 3, padding=1)
        layer = sparsenet.SparseConv2d.from_dense(dense)
        x1, x2 = torch.randn(8, 16, 128, 128), torch.randn(8, 16, 128, 128)
    else:  # 2,048 x 4,096 floats: 32 MiB
        dense = nn.Linear(64, 4096)
        if fmt == "nm":
            keep = torch.rand(4096, 16, 4).argsort(-1) < 2  # 2 of every 4
        else:
            keep = torch.rand(4096, 64) > 0.7
        with torch.no_grad():
            dense.weight.mul_(keep.reshape(4096, 64))
        layer = sparsenet.SparseLinear.from_dense(dense, format=fmt, **options)
        x1, x2 = torch.randn(2048, 64), torch.randn(2048, 64)
    sparsenet.release_output_cache()
    with torch.no_grad():
        first = layer(x1)
        address = first.data_ptr()
        assert first.numel() * 4 >= 32 * 2**20 and sparsenet._C.output_cache_bytes() == 0
        first.fill_(float("nan"))
        del first
        assert sparsenet._C.output_cache_bytes() >= 32 * 2**20
        second = layer(x2)
        assert second.data_ptr() == address and sparsenet._C.output_cache_bytes() == 0
        torch.testing.assert_close(second, dense(x2), rtol=1e-4, atol=1e-4)
        other = layer(x1)  # a new buffer while `second` holds the cached one
        assert other.data_ptr() != address
        torch.testing.assert_close(other, dense(x1), rtol=1e-4, atol=1e-4)
        del second, other
    assert sparsenet.release_output_cache() >= 64 * 2**20
    assert sparsenet._C.output_cache_bytes() == 0 and sparsenet.release_output_cache() == 0


def test_streamed_convolution_outputs_come_from_the_cache_at_any_size():
    # A convolution output written past the caches (more than a third of the last-level cache; a
    # 3-byte cache here makes this 1 MiB one such) comes from the output cache below its 32 MiB floor.
    # As above: the reused buffer was filled with NaN, so a value the kernel does not write shows.
    from torch import nn

    torch.manual_seed(0)
    dense = nn.Conv2d(16, 64, 1)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) > 0.7)
    layer = sparsenet.SparseConv2d.from_dense(dense)
    x1, x2 = torch.randn(2, 16, 45, 45), torch.randn(2, 16, 45, 45)  # 2 x 64 x 45 x 45 floats: 1 MiB
    before = sparsenet._C.set_last_level_cache_bytes(3)
    try:
        sparsenet.release_output_cache()
        with torch.no_grad():
            first = layer(x1)
            address = first.data_ptr()
            first.fill_(float("nan"))
            del first
            assert sparsenet._C.output_cache_bytes() >= 2**20
            second = layer(x2)
            assert second.data_ptr() == address and sparsenet._C.output_cache_bytes() == 0
            torch.testing.assert_close(second, dense(x2), rtol=1e-4, atol=1e-4)
    finally:
        sparsenet._C.set_last_level_cache_bytes(before)
        sparsenet.release_output_cache()


def test_output_cache_keeps_at_most_four_buffers():
    from torch import nn

    layer = sparsenet.SparseLinear.from_dense(nn.Linear(8, 4096))
    sparsenet.release_output_cache()
    # 2,048 + 64 i rows of 4,096 floats, all alive at once: 32-37 MiB, kept in whole 2 MiB pages.
    mib = sorted(-(-(32 + i) // 2) * 2 for i in range(6))
    with torch.no_grad():
        outputs = [layer(torch.randn(2048 + 64 * i, 8)) for i in range(6)]
        assert sparsenet._C.output_cache_bytes() == 0
    del outputs  # six given back (far below the 256 MiB cap): four are kept, in whatever order
    kept = sparsenet._C.output_cache_bytes()
    assert sum(mib[:4]) * 2**20 <= kept <= sum(mib[2:]) * 2**20  # (any five would be more)
    assert sparsenet.release_output_cache() == kept
