"""Peak resident memory of a piece of work in this process (Linux), for the pipeline benchmarks.

tracemalloc cannot see torch's allocations, so the resident-set high-water mark (``VmHWM``) is
reset through ``/proc/self/clear_refs`` before the work and read after it. Where the reset is
not allowed, ``ru_maxrss`` is used, which can only over-state the peak.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Optional


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


# Printed under a table whose peaks came from ru_maxrss rather than a reset high-water mark.
RU_MAXRSS_NOTE = "\n(peak from ru_maxrss: /proc/self/clear_refs was not writable, so peaks may be over-stated)"


def run_isolated(script: str, argv: list[str], flag: str, values, progress=None) -> Optional[list[dict]]:
    """Run ``script argv flag value`` once per value, each in a fresh process so each peak is its
    own, and return the JSON line each printed last; None (their stderr shown) if one failed.
    ``progress(value, result)`` is called after each run."""
    results = []
    for value in values:
        proc = subprocess.run([sys.executable, script, *argv, flag, value], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return None
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if progress is not None:
            progress(value, results[-1])
    return results

