"""Static check of the one-binary-many-ISAs rule: code compiled with ISA flags shares no symbol with
code compiled with other flags.

An inline function or template with external linkage, compiled in two files with different -m
flags, is one symbol to the linker, which keeps an arbitrary copy: the AVX-512 build of a helper
could run on an AVX2-only CPU. No run-time test sees that on an AVX-512 machine, so this reads the
object files of the build that produced the installed module (scikit-build-core's build directory,
build/<tag>/ in the checkout, which `pip install .` leaves behind) with `nm`.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

import sparsenet

ROOT = Path(__file__).resolve().parents[2]


def _identity(so: Path) -> str:
    """The linker's build ID of a shared object (kept when installing rewrites its RPATH), else its bytes."""
    notes = subprocess.run(["readelf", "-n", str(so)], capture_output=True, text=True).stdout
    ids = [line.split(":", 1)[1].strip() for line in notes.splitlines() if "Build ID:" in line]
    return ids[0] if ids else so.read_bytes().hex()


def _build_of_installed_module() -> Path:
    """The build tree that linked the module imported here: its objects are what runs, whatever
    other (older) build trees lie beside it."""
    module = _identity(Path(sparsenet._C.__file__))
    for tree in sorted(ROOT.glob("build/*/")):
        if any(_identity(so) == module for so in tree.glob("_C*.so")):
            return tree / "CMakeFiles" / "_C.dir" / "csrc"
    pytest.fail(f"no build tree under {ROOT}/build/ produced the imported {sparsenet._C.__file__}: build "
                "the package from this checkout (pip install . or pip install --no-build-isolation -e .)")


def _isa_of(obj: Path) -> str:
    name = obj.name
    for isa in ("avx512", "avx2"):
        if f"_{isa}." in name:
            return isa
    return "baseline"  # compiled without ISA flags: the fallback kernels, the dispatcher, bindings


def _exported(obj: Path) -> set[str]:
    """Symbols the object defines with external linkage (global or weak, code or data)."""
    out = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
    return {parts[2] for parts in (line.split() for line in out.splitlines()) if len(parts) == 3
            and (parts[1].isupper() or parts[1] in "uvw")}


def test_isa_objects_share_no_external_definitions():
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.fail("nm and readelf (binutils) are needed for this check")
    tree = _build_of_installed_module()
    by_isa: dict[str, set[str]] = {}
    for obj in tree.rglob("*.o"):
        by_isa.setdefault(_isa_of(obj), set()).update(_exported(obj))
    for isa in set(sparsenet._C.compiled_isas()) - {"fallback"}:
        assert isa in by_isa, f"{isa} kernels are compiled into the module, but {tree} has no {isa} object"
    isas = sorted(by_isa)
    for i, a in enumerate(isas):
        for b in isas[i + 1:]:
            shared = sorted(by_isa[a] & by_isa[b])
            demangled = subprocess.run(["c++filt"], input="\n".join(shared[:10]), capture_output=True,
                                       text=True).stdout if shared else ""
            assert not shared, f"{a} and {b} objects both define {len(shared)} symbols, e.g.:\n{demangled}"
