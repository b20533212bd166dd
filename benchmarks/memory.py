"""Peak resident memory of a piece of work in this process (Linux), for the pipeline benchmarks.

tracemalloc cannot see torch's allocations, so the resident-set high-water mark (``VmHWM``) is
reset through ``/proc/self/clear_refs`` before the work and read after it. Where the reset is
not allowed, ``ru_maxrss`` is used, which can only over-state the peak.
"""
from __future__ import annotations

import resource


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMeter:
    """``start()`` before the work, ``stop()`` after: ``extra`` (bytes above the resident size
    at start), ``peak`` (the process's whole high-water mark) and ``exact`` (reset worked)."""

    def start(self) -> None:
        self.exact = reset_peak()
        self.rss_before = status_kb("VmRSS") * 1024
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> None:
        if self.exact:
            self.peak = status_kb("VmHWM") * 1024
            self.extra = self.peak - self.rss_before
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.extra = self.peak - min(self.rss_before, self.maxrss_before)
