"""Facts about the CPU sparsenet runs on, read from the machine (never constants): its model name and
its last-level cache size. A leaf module: the automatic format choice keys its timings by them, and
the benchmarks print them beside every figure."""
from __future__ import annotations

import glob
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def last_level_cache_bytes() -> int:
    """The largest cache sysfs lists for CPU 0 (the last level: 32 MiB on the Zen 4 machines here,
    300 MiB on the Xeons); 0 where sysfs lists none."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=0)
