"""Does a model mixing dense torch layers and sparsenet layers keep the cores busy without two
thread pools fighting? Measures the mixed model against the sum of its parts.

    python benchmarks/thread_pools.py

sparsenet's native module links the OpenMP runtime by its soname (libgomp.so.1); `import sparsenet`
imports torch first, so the dynamic loader hands the native module torch's already-loaded runtime
and both run on one pool of threads (printed below). If the two paid for each other (spinning
workers of one pool stealing the cores of the other), the mixed model would be slower than the sum.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import sparsenet
from sparsenet.ops.runtime import openmp_libraries


def median_ms(fn, rounds=30):
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(width=2048, pairs=4, batch=16, threads=2):
    torch.set_num_threads(threads)
    sparsenet.set_num_threads(threads)
    torch.manual_seed(0)
    dense_layers = [nn.Linear(width, width) for _ in range(pairs)]
    sparse_layers = []
    for _ in range(pairs):
        lin = nn.Linear(width, width)
        sparsenet.prune(lin, 0.9, progress=False).finalize()
        sparse_layers.append(sparsenet.SparseLinear.from_dense(lin))
    x = torch.randn(batch, width)
    with torch.inference_mode():
        mixed = nn.Sequential(*[m for pair in zip(dense_layers, sparse_layers) for m in pair])
        only_dense = nn.Sequential(*dense_layers)
        only_sparse = nn.Sequential(*sparse_layers)
        results = {"dense": [], "sparse": [], "mixed": []}
        for _ in range(5):  # interleave the three, then take medians
            results["dense"].append(median_ms(lambda: only_dense(x)))
            results["sparse"].append(median_ms(lambda: only_sparse(x)))
            results["mixed"].append(median_ms(lambda: mixed(x)))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"OpenMP runtimes in this process: {openmp_libraries()}")
    print(f"{pairs} dense + {pairs} sparse (90%) {width}x{width} layers, batch {batch}, {threads} threads:")
    print(f"  dense layers alone   {med['dense']:8.2f} ms")
    print(f"  sparse layers alone  {med['sparse']:8.2f} ms")
    print(f"  sum of the parts     {med['dense'] + med['sparse']:8.2f} ms")
    print(f"  mixed model          {med['mixed']:8.2f} ms  ({med['mixed'] / (med['dense'] + med['sparse']):.2f}x the sum)")


if __name__ == "__main__":
    main()
