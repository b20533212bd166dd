"""Run-time settings of the native kernels: threads, instruction set, build facts."""
from __future__ import annotations

import os

import torch

from sparsenet import _C
from sparsenet._machine import last_level_cache_bytes

_ISA_ENV = "SPARSENET_ISA"


def set_num_threads(n: int) -> None:
    """Threads the sparse kernels use (defaults to ``torch.get_num_threads()`` at import).

    At most :func:`usable_threads` (the CPUs this process may run on): ValueError beyond that. In a
    process forked after sparsenet was loaded (a fork-started DataLoader worker, a pre-fork server's
    worker), the kernels run on one thread and asking for more raises RuntimeError: GNU OpenMP
    cannot start threads in such a child, and would hang.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {n!r}")
    limit = usable_threads()
    if n > limit:  # here too, so that ints too large for C never reach the binding
        raise ValueError(f"num_threads={n} exceeds the {limit} CPUs this process may run on")
    _C.set_num_threads(n)


def usable_threads() -> int:
    """The CPUs this process may run on (its affinity mask, capped by OpenMP's thread limit)."""
    return _C.usable_threads()


def get_num_threads() -> int:
    return _C.get_num_threads()


def available_isas() -> list[str]:
    """Kernel families this build contains and this CPU can run, best first."""
    return list(_C.supported_isas())


def get_isa() -> str:
    return _C.active_isa()


def set_isa(name: str) -> None:
    """Force a kernel family ("avx512", "avx2" or "fallback"); the default is the best available."""
    if name not in _C.compiled_isas():
        raise ValueError(f"unknown ISA {name!r}; this build has {list(_C.compiled_isas())}")
    if name not in _C.supported_isas():
        raise ValueError(f"this CPU cannot run {name!r}; it supports {list(_C.supported_isas())}")
    _C.set_isa(name)


def release_output_cache() -> int:
    """Unmaps the large outputs (32 MiB and up) the CPU kernels keep for reuse; returns the bytes.

    An output that large is never served by glibc from memory it has touched before: every page of
    it would fault in anew on every call. The kernels therefore keep up to four freed ones (256 MiB
    at most) for the next outputs of about the same size. Call this to give that memory back at
    once, e.g. after a large batch job; it is also given back piecemeal as newer outputs replace
    older ones.
    """
    return _C.release_output_cache()


def cuda_built() -> bool:
    """Whether this build has its CUDA kernels (``sparsenet._C_cuda``)."""
    from sparsenet.ops import cuda

    return cuda.available()


def cuda_architectures() -> list[str]:
    """The GPU code the CUDA module carries (``sm_80``, ``sm_90a``, ``compute_90``...); empty without it."""
    from sparsenet.ops import cuda
    from sparsenet.ops.fatbin import architectures

    return sorted(architectures(cuda._C_cuda.__file__)) if cuda.available() else []


def openmp_libraries() -> list[str]:
    """OpenMP runtimes mapped into this process (Linux). One means torch and sparsenet share a pool."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line})
    except OSError:
        return []


def config() -> dict:
    from sparsenet._version import __version__

    return {
        "sparsenet": __version__,
        "torch": torch.__version__,
        "compiler": _C.compiler,
        "openmp": _C.openmp_version,
        "openmp_runtime": openmp_libraries(),
        "isa": get_isa(),
        "isa_available": available_isas(),
        "isa_compiled": list(_C.compiled_isas()),
        "num_threads": get_num_threads(),
        "usable_threads": usable_threads(),
        "forked_child": _C.in_forked_child(),
        "last_level_cache": _C.last_level_cache_bytes(),
        "cuda_built": cuda_built(),
        "cuda_architectures": cuda_architectures(),
    }


def show_config() -> None:
    """Print version, compiler, ISA in use, threads and whether CUDA kernels were built."""
    for key, value in config().items():
        print(f"{key:>15}: {value}")


def _init_from_environment() -> None:
    # torch's count comes from OMP_NUM_THREADS and the like, which may ask for more CPUs than this
    # process has: clamped, never an import failure.
    _C.set_num_threads(min(max(1, torch.get_num_threads()), usable_threads()))
    # The kernels plan some writes by the cache (convolutions stream outputs past a third of it).
    _C.set_last_level_cache_bytes(last_level_cache_bytes())
    isa = os.environ.get(_ISA_ENV)
    if isa:
        try:
            set_isa(isa)
        except ValueError as e:
            raise ImportError(f"{_ISA_ENV}={isa!r}: {e}") from None
