"""A/B of two builds of the native convolution kernel in one process, call by call (the convolution
counterpart of ab_native.py, whose reasons apply: process-to-process medians here move by more than
most kernel changes gain).

    cp build/<tag>/_C*.so /tmp/base_C.so      # the baseline build, before the change
    # ... rebuild with the change ...
    python benchmarks/ab_conv.py /tmp/base_C.so [--sparsities 0.7,0.9] [--batches 1,8]

Both modules' CsrHandle.conv2d run on the same weights and inputs over conv_table.py's ResNet-18 3x3
shapes and a few MobileNetV2 1x1 ones, alternately (order swapped every round), back to back, so
input and weights are warm in cache (conv_table.py measures the interleaved-with-dense case). Checks
that both builds agree, then prints each build's median time per shape, new / baseline, and the
median ratio per (sparsity, batch), with the CPU.

--in-a-row times each build's pass over all the shapes, one layer after another as in a model
(after an untimed pass of the same build), alternating builds pass by pass: how a build leaves its
scratch and caches for the next layer is then part of what is measured, which call-by-call
alternation hides (per-thread planes measured 0.98-1.00x there, about 0.95x in median in a row).

--evict writes twice the last-level cache (on torch's threads, so sparsenet's stay awake) before
every timed call, so weights and input come from DRAM, as for a layer of a model bigger than the
cache: small planes, whose few tiles reuse each weight only a few times, then wait on memory (512
channels at 7 x 7, 80%: 20-60% slower than warm).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ab_native import load_baseline
from conv_table import MOBILENETV2_1X1, RESNET18_3X3
from machine import cpu_label, last_level_cache_bytes

from sparsenet import _C as new_C

SHAPES = RESNET18_3X3 + [MOBILENETV2_1X1[i] for i in (2, 3, 8, 9)]


def calls_for(modules, cin, cout, k, stride, size, sparsity, batch, block_rows=1):
    torch.manual_seed(0)
    weight = torch.randn(cout, cin * k * k)
    weight[(torch.rand(cout // block_rows, cin * k * k) < sparsity).repeat_interleave(block_rows, 0)] = 0
    csr = weight.to_sparse_csr()
    crow = csr.crow_indices().to(torch.int64).numpy()
    col = csr.col_indices().to(torch.int32).numpy()
    values = csr.values().contiguous().numpy()
    x = torch.randn(batch, cin, size, size).numpy()
    side = (size + 2 * (k // 2) - k) // stride + 1
    geometry = [k, k, stride, stride, k // 2, k // 2, 1, 1, 1]
    outs, calls = [], []
    for module in modules:
        handle = module.CsrHandle(cout, cin * k * k, crow, col, values, False, None)
        out = torch.empty(batch, cout, side, side)
        outs.append(out)
        calls.append(lambda h=handle, o=out.numpy(): h.conv2d(values, x, o, None, geometry))
    return calls, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="path of the baseline build's _C*.so")
    parser.add_argument("--sparsities", default="0.7,0.9")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--in-a-row", action="store_true")
    parser.add_argument("--evict", action="store_true", help="sweep 2x the last-level cache before each timed call")
    parser.add_argument("--block-rows", type=int, default=1, help="prune in blocks of this many output channels")
    parser.add_argument("--isa", default=None, help="the kernel family both builds run (default: the best)")
    args = parser.parse_args()
    modules = (load_baseline(args.baseline), new_C)
    sweep = torch.ones(2 * last_level_cache_bytes() // 4) if args.evict else None
    torch.set_num_threads(args.threads)
    for module in modules:
        module.set_num_threads(args.threads)
        if args.isa:  # (on both: SPARSENET_ISA is read by the package, which the baseline is loaded without)
            module.set_isa(args.isa)
    print(f"{cpu_label()}, {args.threads} threads, ISA {modules[1].active_isa()}; median of {args.rounds} "
          "alternating calls")
    for sparsity in (float(v) for v in args.sparsities.split(",")):
        for batch in (int(v) for v in args.batches.split(",")):
            ratios, passes = [], ([], [])
            for cin, cout, k, stride, size in SHAPES:
                calls, outs = calls_for(modules, cin, cout, k, stride, size, sparsity, batch, args.block_rows)
                for call in calls * 2:
                    call()
                torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-3)
                for which in (0, 1):
                    passes[which].append(calls[which])
                if args.in_a_row:
                    continue
                times = ([], [])
                for r in range(args.rounds):
                    for which in ((0, 1) if r % 2 else (1, 0)):
                        if sweep is not None:
                            sweep.add_(1.0)  # (written, so the lines leave dirty and the cache is emptied)
                        start = time.perf_counter()
                        calls[which]()
                        times[which].append(time.perf_counter() - start)
                base, new = (1e3 * statistics.median(t) for t in times)
                ratios.append(new / base)
                print(f"{sparsity:.0%} batch {batch} {cin}->{cout} {k}x{k} s{stride} {size}x{size}: "
                      f"baseline {base:.3f} ms, new {new:.3f} ms, new/baseline {new / base:.2f}", flush=True)
            if args.in_a_row:
                times = ([], [])
                for r in range(args.rounds + 1):
                    for which in ((0, 1) if r % 2 else (1, 0)):
                        for call in passes[which]:  # untimed: the build's own previous layers first
                            call()
                        start = time.perf_counter()
                        for call in passes[which]:
                            call()
                        times[which].append(time.perf_counter() - start)
                base, new = (1e3 * statistics.median(t[1:]) for t in times)
                print(f"== {sparsity:.0%} batch {batch}: the {len(SHAPES)} shapes in a row: baseline {base:.3f} ms, "
                      f"new {new:.3f} ms, new/baseline {new / base:.3f}")
                continue
            print(f"== {sparsity:.0%} batch {batch}: median new/baseline {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
