"""Shared set-up for the Linear-layer benchmarks: weight sets that exceed the last-level cache,
the three contenders as callables with the same input and output layout, and the machine's limits.
"""
from __future__ import annotations

import ctypes
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sparsenet
from machine import last_level_cache_bytes
from sparsenet.formats import hugepages
from sparsenet.nn import SparseLinear

SHAPES = [(4096, 4096), (1536, 384), (384, 1536)]  # (out_features, in_features)
SPARSITIES = [0.5, 0.7, 0.9, 0.95]
BATCHES = [1, 8, 64, 256]
LLC_BYTES = last_level_cache_bytes()  # read from the machine; rotation sets hold at least 2x this per method
MAX_COPIES = 400


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    sparsenet.set_num_threads(n)


def keep_freed_memory() -> bool:
    """Tells glibc to keep what the process frees (no trimming of the heap, no fresh mappings for big
    blocks), so that no contender's time includes refilling memory that glibc handed back to the
    kernel. By default glibc maps blocks over its threshold afresh and trims the heap's top; a layer
    timed beside another then faults its output in page by page on many calls: dense torch's 1x1
    convolution at 24->144, 56 x 56, batch 8 took 7,612 page faults a call (23 ms against 4.4 ms
    without). Returns False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))


def interleaved_medians(calls: dict, rounds: int) -> dict:
    """Median seconds per call of each of ``calls`` (name -> callable), called in turn round by round,
    the order reversed every other round (no contender always runs after the same one)."""
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name, fn in (list(calls.items()) if r % 2 == 0 else list(reversed(calls.items()))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _copies(bytes_per_copy: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(2 * LLC_BYTES / max(bytes_per_copy, 1))))


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Rotation:
    """Cycles through several copies of a layer so each call reads its weights from DRAM."""

    def __init__(self, items):
        self.items = items
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


@dataclass
class Contenders:
    dense: Rotation
    torch_csr: Rotation
    sparsenet: Rotation
    nnz: int
    sparse_bytes: int  # bytes one sparsenet call reads for its weight (values + indices + row pointers)
    dense_bytes: int

    @property
    def copies(self) -> int:
        """Calls that touch every copy once: the warm-up each contender needs (first calls prepare)."""
        return max(len(self.dense.items), len(self.torch_csr.items), len(self.sparsenet.items))


def make_contenders(out_features: int, in_features: int, sparsity: float, seed: int = 0) -> Contenders:
    """Independent random weights per copy (same sparsity), so no copy is served from cache."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_features, in_features, generator=g)
    keep = torch.rand(out_features, in_features, generator=g) >= sparsity
    pruned = base * keep
    sparse0 = SparseLinear.from_dense(_linear(pruned))
    sparse_bytes = _tensor_bytes(sparse0.crow_indices, sparse0.col_indices, sparse0.values)
    dense_bytes = _tensor_bytes(pruned)
    # Copy i of every contender holds the same weights (rows permuted by perms[i]), so copy 0 of
    # each can be checked against the others (check_agreement).
    torch_csr_bytes = 12 * sparse0.nnz + 8 * (out_features + 1)  # int64 indices + float32 values
    counts = (_copies(dense_bytes), _copies(torch_csr_bytes), _copies(sparse_bytes))
    perms = [torch.arange(out_features)] + [torch.randperm(out_features, generator=g) for _ in range(max(counts) - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "CSR support is in beta"
        dense = [pruned[p].contiguous() for p in perms[: counts[0]]]
        tcsr = [pruned[p].to_sparse_csr() for p in perms[: counts[1]]]
    ours = [SparseLinear.from_dense(_linear(pruned[p])) for p in perms[: counts[2]]]
    return Contenders(Rotation(dense), Rotation(tcsr), Rotation(ours), sparse0.nnz, sparse_bytes, dense_bytes)


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def callables(c: Contenders, x: torch.Tensor) -> dict:
    """y = x W^T as each contender computes it, every transpose and layout change included."""

    def dense():
        return F.linear(x, c.dense.next())

    def torch_csr():
        # torch's fastest CSR path here (F.linear on a CSR weight is ~10x slower).
        return torch.sparse.mm(c.torch_csr.next(), x.t()).t().contiguous()

    def ours():
        return c.sparsenet.next()(x)

    return {"dense": dense, "torch.sparse": torch_csr, "sparsenet": ours}


def check_agreement(c: Contenders, x: torch.Tensor, tolerance: float = 1e-4) -> float:
    """Max relative difference of torch.sparse and sparsenet from dense on copy 0; raises if too big."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = F.linear(x, c.dense.items[0]).double()
        outs = (torch.sparse.mm(c.torch_csr.items[0], x.t()).t(), c.sparsenet.items[0](x))
    scale = ref.abs().max().clamp_min(1e-12)
    err = max(((o.double() - ref).abs().max() / scale).item() for o in outs)
    if err > tolerance:
        raise AssertionError(f"contenders disagree: max relative error {err:.2e}")
    return err


class ReadProbe:
    """A streaming read of twice the last-level cache, at least 256 MiB (torch.sum, current threads),
    timed with the same statistic as the kernels it is the limit for (the median), next to them in
    time. Not interleaved with their rounds here: such a read flushes every cache and TLB, which would
    change what small layers cost (formats_table.py, whose contenders all read from DRAM, does
    interleave it). (On a 300 MiB L3 a 256 MiB probe would measure the cache.)

    The buffer lives in huge pages, as the sparse formats' weights do (sparsenet.formats.hugepages):
    from 4 KiB pages torch.sum read 28 GB/s where it read 32 from 2 MiB pages in the same minute
    (AMD EPYC, 2 threads), and the CSR kernel came out at up to 110% of a limit taken that way."""

    BYTES = max(256 * 2**20, 2 * LLC_BYTES)

    def __init__(self):
        self.buf = hugepages.empty_group([(self.BYTES // 4, torch.float32)])[0].fill_(1.0)
        self.buf.sum()

    def read(self) -> None:
        """One streaming read of BYTES (for callers that time it among their own calls)."""
        self.buf.sum()

    def bandwidth(self, calls: int = 7) -> float:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            self.read()
            times.append(time.perf_counter() - t)
        return self.BYTES / statistics.median(times)


def peak_flops(seconds: float = 0.5) -> float:
    """FLOP/s of a large dense float32 GEMM (the practical compute ceiling with these threads)."""
    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 1024 * 2048 * 2048 / best
