"""What the benchmarks need to know about this machine, read from it: the CPU's name (printed beside
every figure) and the last-level cache size (weights rotated past it, bandwidth probes larger than
it). The package's own readers (sparsenet._machine), with a refusal where sysfs lists no cache: a
guess would silently measure a cache."""
from __future__ import annotations

from sparsenet._machine import cpu_model as cpu_name
from sparsenet._machine import last_level_cache_bytes as _listed_cache_bytes


def last_level_cache_bytes() -> int:
    size = _listed_cache_bytes()
    if not size:
        raise RuntimeError("no cache sizes under /sys/devices/system/cpu/cpu0/cache: cannot size the weight "
                           "rotation past the last-level cache")
    return size


def cpu_label() -> str:
    """The CPU with its last-level cache, as figures name it: "AMD EPYC (last-level cache 32 MiB)"."""
    return f"{cpu_name()} (last-level cache {last_level_cache_bytes() / 2**20:.0f} MiB)"
