"""Per-call overhead of the sparsenet op, and the registration path that costs least.

    python benchmarks/overhead.py

Times (median of many calls, microseconds):
  * an empty op registered like sparsenet's (torch.library.Library define + CPU impl + fake),
  * the same empty op registered with the torch.library.custom_op decorator,
  * nn.Linear and SparseLinear on a 1x1 weight (fixed cost of a layer call),
  * 384x1536 (out x in) at 90% sparsity, batch 1: dense vs sparsenet, weights rotated past the L3.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import callables, make_contenders, set_threads  # noqa: E402

import sparsenet  # noqa: E402
from sparsenet.nn import SparseLinear  # noqa: E402


def per_call_us(fn, calls: int = 20000, repeats: int = 7) -> float:
    for _ in range(100):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(samples)


def empty_ops():
    lib = torch.library.Library("sparsenet_overhead", "DEF")  # noqa: TOR901
    lib.define("empty(Tensor x) -> Tensor")
    lib.impl("empty", lambda x: x, "CPU")
    torch.library.register_fake("sparsenet_overhead::empty", lambda x: x, lib=lib)

    @torch.library.custom_op("sparsenet_overhead::empty_decorated", mutates_args=())
    def empty_decorated(x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # custom_op forbids returning an input alias; clone of 1 float is ~0.3 us

    @empty_decorated.register_fake
    def _(x):
        return torch.empty_like(x)

    return lib, torch.ops.sparsenet_overhead.empty, empty_decorated


def main() -> None:
    set_threads(2)
    lib, library_op, decorated_op = empty_ops()
    x1 = torch.randn(1, 1)
    rows = []
    with torch.inference_mode():
        rows.append(("empty op, Library.define + impl (sparsenet's path)", per_call_us(lambda: library_op(x1))))
        rows.append(("empty op, @torch.library.custom_op", per_call_us(lambda: decorated_op(x1))))
        rows.append(("x.clone() on 1 float (included in the line above)", per_call_us(lambda: x1.clone())))
        lin = nn.Linear(1, 1)
        sp = SparseLinear.from_dense(lin)
        rows.append(("nn.Linear 1x1, batch 1", per_call_us(lambda: lin(x1))))
        rows.append(("SparseLinear 1x1, batch 1", per_call_us(lambda: sp(x1))))
        for label, us in rows:
            print(f"{label:<55} {us:7.2f} us")

        c = make_contenders(384, 1536, 0.9)
        x = torch.randn(1, 1536)
        fns = callables(c, x)
        times = {k: [] for k in fns}
        for _ in range(c.copies):  # warm every rotated copy once
            for fn in fns.values():
                fn()
        for _ in range(200):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        print(f"\n384x1536 (out x in), 90% sparse, batch 1, rotated weights, median of 200 interleaved rounds:")
        for k, v in med.items():
            print(f"  {k:<13} {v:8.1f} us   {med['dense'] / v:5.2f}x dense")
        print(f"(sparsenet {sparsenet.__version__}, ISA {sparsenet.get_isa()}, 2 threads)")


if __name__ == "__main__":
    main()
