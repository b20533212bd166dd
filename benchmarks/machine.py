"""What the benchmarks need to know about this machine, read from it: the CPU's name (printed beside
every figure) and the last-level cache size (weights rotated past it, bandwidth probes larger than it)."""
from __future__ import annotations

import glob
import platform


def last_level_cache_bytes() -> int:
    """The largest cache sysfs lists for CPU 0 (the last level: 32 MiB on the Zen 4 machines here,
    300 MiB on the Xeons). Raises where sysfs lists none: a constant would silently measure a cache."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    if not sizes:
        raise RuntimeError("no cache sizes under /sys/devices/system/cpu/cpu0/cache: cannot size the weight "
                           "rotation past the last-level cache")
    return max(sizes)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_label() -> str:
    """The CPU with its last-level cache, as figures name it: "AMD EPYC (L3 32 MiB)"."""
    return f"{cpu_name()} (last-level cache {last_level_cache_bytes() / 2**20:.0f} MiB)"
