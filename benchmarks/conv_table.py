"""Sparse convolutions against dense torch (oneDNN) on the shapes of ResNet-18's 3x3 convolutions and
MobileNetV2's 1x1 ones, unstructured sparsity, batch 1 and 8: time per call, speedup, and the median
speedup per (sparsity, batch) over the shapes.

    python benchmarks/conv_table.py [--sparsities 0.7,0.9] [--batches 1,8] [--rounds 20] [--set resnet,mobilenet]
                                    [--block-rows 4]

--block-rows R prunes in blocks of R output channels x 1 weight column (every R consecutive output
channels keep the same columns, as ``prune(structure="block", block=(R, 1))`` leaves them), which the
kernel runs R rows at a time.

Dense and sparse calls are interleaved, medians reported; contiguous (NCHW) inputs. Names the CPU.

glibc is told to keep the memory the process frees (common.keep_freed_memory), so neither
contender's time includes page faults on outputs glibc had handed back to the kernel, which dense
torch's pointwise layers paid on most calls here (and the sparse ones on some); --allocator as-is
measures with glibc's defaults.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from common import interleaved_medians, keep_freed_memory, set_threads
from machine import cpu_label

from sparsenet.nn import SparseConv2d

# (in, out, kernel, stride, input size)
RESNET18_3X3 = [(64, 64, 3, 1, 56), (64, 128, 3, 2, 56), (128, 128, 3, 1, 28), (128, 256, 3, 2, 28),
                (256, 256, 3, 1, 14), (256, 512, 3, 2, 14), (512, 512, 3, 1, 7)]
MOBILENETV2_1X1 = [(16, 96, 1, 1, 112), (96, 24, 1, 1, 56), (24, 144, 1, 1, 56), (144, 24, 1, 1, 56),
                   (32, 192, 1, 1, 28), (192, 32, 1, 1, 28), (64, 384, 1, 1, 14), (384, 64, 1, 1, 14),
                   (96, 576, 1, 1, 14), (576, 96, 1, 1, 14), (160, 960, 1, 1, 7), (960, 160, 1, 1, 7),
                   (320, 1280, 1, 1, 7)]


def pair(cin, cout, k, stride, sparsity, seed=0, block_rows=1):
    torch.manual_seed(seed)
    dense = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).eval()
    with torch.no_grad():
        keep = torch.rand(cout // block_rows, cin * k * k) >= sparsity
        dense.weight.mul_(keep.repeat_interleave(block_rows, 0).reshape(dense.weight.shape))
    return dense, SparseConv2d.from_dense(dense).eval()


def median_ms(calls: dict, rounds: int) -> dict:
    # Warm-up of a few calls each, interleaved: the first calls of a process measured up to 2x slower
    # for both contenders (thread pools, scratch buffers, page faults).
    for _ in range(3):
        for fn in calls.values():
            fn()
    return {name: 1e3 * seconds for name, seconds in interleaved_medians(calls, rounds).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.7,0.9")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", default="resnet,mobilenet")
    parser.add_argument("--block-rows", type=int, default=1)
    parser.add_argument("--allocator", choices=["keep", "as-is"], default="keep",
                        help="keep: glibc keeps freed memory (no page faults refilling it); as-is: glibc's defaults")
    args = parser.parse_args(argv)
    kept = args.allocator == "keep" and keep_freed_memory()
    set_threads(args.threads)
    shapes = {"resnet": RESNET18_3X3, "mobilenet": MOBILENETV2_1X1}
    chosen = [(name, s) for name in args.set.split(",") for s in shapes[name]]
    structure = "unstructured" if args.block_rows == 1 else f"blocks of {args.block_rows} output channels x 1 column"
    allocator = "glibc keeps freed memory" if kept else "glibc's allocator as it comes"
    print(f"{cpu_label()}, {args.threads} threads; median of {args.rounds} interleaved calls, NCHW float32; {structure}; "
          f"{allocator}")
    print("| set | conv (in->out, k, stride, input) | sparsity | batch | dense ms | sparse ms | speedup |\n"
          "|---|---|---|---|---|---|---|")
    summary = {}
    with torch.inference_mode():
        for sparsity in (float(v) for v in args.sparsities.split(",")):
            for batch in (int(v) for v in args.batches.split(",")):
                for name, (cin, cout, k, stride, size) in chosen:
                    dense, sparse = pair(cin, cout, k, stride, sparsity, block_rows=args.block_rows)
                    x = torch.randn(batch, cin, size, size)
                    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
                    t = median_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, args.rounds)
                    gain = t["dense"] / t["sparse"]
                    summary.setdefault((name, sparsity, batch), []).append(gain)
                    print(f"| {name} | {cin}->{cout}, {k}x{k}, s{stride}, {size}x{size} | {sparsity:.0%} | {batch} | "
                          f"{t['dense']:.3f} | {t['sparse']:.3f} | {gain:.2f}x |", flush=True)
    print("\n| set | sparsity | batch | median speedup over the shapes |\n|---|---|---|---|")
    for (name, sparsity, batch), gains in summary.items():
        print(f"| {name} | {sparsity:.0%} | {batch} | {statistics.median(gains):.2f}x |")


if __name__ == "__main__":
    main()
