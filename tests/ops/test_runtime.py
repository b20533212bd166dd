"""Run-time configuration: threads, ISA override, one OpenMP runtime shared with torch."""
import os
import subprocess
import tempfile
import sys

import pytest

import sparsenet
from sparsenet.ops.runtime import config, openmp_libraries


def test_config_reports_the_build():
    cfg = config()
    assert cfg["sparsenet"] == sparsenet.__version__
    assert cfg["isa"] in cfg["isa_available"] and "fallback" in cfg["isa_compiled"]
    assert cfg["num_threads"] == sparsenet.get_num_threads() and cfg["cuda_built"] is False


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
