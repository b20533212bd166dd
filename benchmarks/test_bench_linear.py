"""pytest-benchmark suite: dense F.linear vs torch.sparse CSR vs sparsenet, per shape/sparsity/batch.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:shape,param:sparsity,param:batch

Weights rotate through enough copies to exceed the L3 cache (see common.py), threads are equal for
all three (SPARSENET_BENCH_THREADS, default 2). Ratios across separate benchmark runs are noisy on a
shared machine; benchmarks/speedup_table.py interleaves rounds and is what BENCHMARKS.md records.
"""
import os

import pytest
import torch

from common import BATCHES, SHAPES, SPARSITIES, callables, make_contenders, set_threads

THREADS = int(os.environ.get("SPARSENET_BENCH_THREADS", "2"))
_cache = {}


def contenders(shape, sparsity):
    key = (shape, sparsity)
    if key not in _cache:
        _cache.clear()  # keep one configuration's weights in memory at a time
        _cache[key] = make_contenders(*shape, sparsity)
    return _cache[key]


@pytest.mark.parametrize("method", ["dense", "torch.sparse", "sparsenet"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear(benchmark, shape, sparsity, batch, method):
    set_threads(THREADS)
    c = contenders(shape, sparsity)
    x = torch.randn(batch, shape[1])
    fn = callables(c, x)[method]
    benchmark.extra_info.update(nnz=c.nnz, sparse_bytes=c.sparse_bytes, threads=THREADS)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=c.copies)
