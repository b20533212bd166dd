"""``sparsify(format="auto")``: each layer's format chosen by measurement on this machine.

For a layer, dense (``F.linear``) and every registered sparse format that fits it (BSR only where the
weight is pruned in blocks) are built from its weight and
timed at its real shape on ``rows`` rows per call (tokens x sequences for a transformer), calls
interleaved, the caches flushed between rounds so that each call reads its weight from memory as it
does inside a model larger than the cache. The fastest wins; a layer stays dense when nothing beats
it. On the CPU a format that at ``rows`` rows runs CSR's kernels over a structure derived from its
own (N:M from 4 rows, bitmap on AVX2 from 5: ``_C.runs_csr_kernels``) is not timed: it would be CSR's
speed on more bytes, its own structure and the derived one, and timing noise alone would decide
between the two.

A layer on a CUDA device is timed there, in its dtype (every format has CUDA kernels), by CUDA
events with the L2 cache flushed before each call.

Timings are cached in a JSON file in the user's cache directory (``$SPARSENET_CACHE_DIR``, else
``$XDG_CACHE_HOME/sparsenet``, else ``~/.cache/sparsenet``), keyed by CPU model and threads (or GPU
and dtype), shape, density (to the percent), rows, the formats timed and the native build that was
timed (a new build's kernels may rank differently; a convolution's key also says how many of its
output channels the kernel runs together): layers of one shape are timed once, and converting the
same model again times nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sparsenet import _C
from sparsenet._machine import cpu_model, last_level_cache_bytes
from sparsenet.formats import registry
from sparsenet.ops.handles import csr_handle

ROUNDS = 7  # interleaved timed calls per candidate (medians compared)


@dataclass
class Measured:
    """Seconds per call of every candidate for one layer, and the one chosen."""

    seconds: dict[str, float]
    cached: bool = False
    layers: dict = field(default_factory=dict)  # the SparseLinear built per format, when timed now

    @property
    def choice(self) -> str:
        return min(self.seconds, key=self.seconds.get)

    @property
    def gain(self) -> float:
        """Dense time over the chosen format's (1.0 when dense is chosen)."""
        return self.seconds["dense"] / self.seconds[self.choice]


def cache_path() -> str:
    root = os.environ.get("SPARSENET_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsenet")
    return os.path.join(root, "format_timings.json")


class _Flusher:
    """Reads twice the last-level cache between rounds, evicting the weights timed before."""

    def __init__(self) -> None:
        size = 2 * last_level_cache_bytes()  # 0 where sysfs lists no cache: nothing is flushed
        self.buffer = torch.ones(size // 4) if size else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.sum()


def time_calls(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, interleaved round by round, caches flushed
    before every call. (Tests replace this function to check that choices follow the times.)"""
    flush = _Flusher()
    for fn in calls.values():  # first calls build handles and fault pages in
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            flush()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_calls_cuda(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """:func:`time_calls` for work enqueued on the current CUDA device: device seconds per call from
    CUDA events, the L2 cache flushed (a write of twice its size) before every call."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    flush = torch.empty(2 * (getattr(props, "L2_cache_size", 0) or 64 << 20) // 4, device="cuda")
    for fn in calls.values():  # first calls build handles (which synchronise once)
        fn()
    torch.cuda.synchronize()
    events: dict[str, list] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(a.elapsed_time(b) / 1e3 for a, b in pairs) for name, pairs in events.items()}


@functools.lru_cache(maxsize=None)
def build_tag() -> str:
    """A short digest of the native modules' files: timings measured with one build's kernels do not
    answer for another's (read once per process, when a layer is first timed)."""
    digest = hashlib.sha1()
    modules = [_C]
    try:
        from sparsenet import _C_cuda

        modules.append(_C_cuda)
    except ImportError:
        pass
    for module in modules:
        with open(module.__file__, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _gpu(device: torch.device, dtype: torch.dtype) -> str:
    """The cache keys' name for a GPU and the dtype timed on it."""
    return f"{torch.cuda.get_device_name(device)}|{str(dtype).removeprefix('torch.')}"


def _timed_on(device: torch.device, calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """:func:`time_calls`, or :func:`time_calls_cuda` on that device for a CUDA one; in inference mode."""
    with torch.inference_mode():
        if device.type != "cuda":
            return time_calls(calls)
        with torch.cuda.device(device):
            return time_calls_cuda(calls)


class TimingCache:
    """The JSON file of measured timings; an unreadable file is treated as empty and rewritten."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path or cache_path()
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.entries = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(shape: tuple[int, int], density: float, rows: int, formats: list[str], machine: Optional[str] = None) -> str:
        # The candidates are part of the key: a block-structured weight is timed with BSR as well,
        # and its entry must not answer for an unstructured weight of the same shape and density.
        # machine: a GPU and dtype the layer runs on; else this CPU, with its threads (keys as
        # written before GPUs were timed, so earlier caches still answer).
        where = f"{machine}|{shape[0]}x{shape[1]}|{density:.2f}|rows={rows}" if machine else (
            f"{cpu_model()}|{shape[0]}x{shape[1]}|{density:.2f}|rows={rows}|threads={torch.get_num_threads()}")
        return f"{where}|{'+'.join(formats)}|build={build_tag()}"

    def get(self, key: str, formats: list[str]) -> Optional[dict[str, float]]:
        found = self.entries.get(key)
        if isinstance(found, dict) and all(isinstance(found.get(f), (int, float)) for f in ["dense", *formats]):
            return {f: float(found[f]) for f in ["dense", *formats]}
        return None

    def put(self, key: str, seconds: dict[str, float]) -> None:
        self.entries[key] = seconds
        try:  # written whole, then renamed: a concurrent reader never sees half a file
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: the choice still holds for this call, it is just not remembered


def measure(weight: torch.Tensor, keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], rows: int,
            cache: TimingCache) -> Measured:
    """Time dense against every registered format that fits this (out, in) weight (``registry.fitting``:
    BSR only for block-structured ones) at ``rows`` rows per call, on the weight's device in its
    dtype; from the cache when this machine has timed such a layer before."""
    from sparsenet.nn.linear import SparseLinear

    device, dtype = weight.device, weight.dtype
    on_cuda = device.type == "cuda"
    weight = weight.detach().to("cpu", torch.float32)  # formats are built from CPU float32 weights
    keep = None if keep is None else keep.to("cpu")
    bias = None if bias is None else bias.detach().to("cpu", torch.float32)
    kept = keep if keep is not None else weight != 0
    formats = registry.fitting(kept)
    if not on_cuda:
        formats = [f for f in formats if not _C.runs_csr_kernels(f, rows)]
    shape = tuple(weight.shape)
    density = int(kept.sum()) / weight.numel() if weight.numel() else 0.0
    key = cache.key(shape, density, rows, formats, _gpu(device, dtype) if on_cuda else None)
    seconds = cache.get(key, formats)
    if seconds is not None:
        return Measured(seconds, cached=True)
    dense_weight = weight.contiguous()
    layers = {f: SparseLinear.from_packed(registry.get(f).from_dense(dense_weight, keep), bias) for f in formats}
    if on_cuda:
        layers = {f: layer.to(device, dtype) for f, layer in layers.items()}
        dense_weight = dense_weight.to(device, dtype)
        bias = None if bias is None else bias.to(device, dtype)
    x = torch.randn(rows, shape[1], device=device, dtype=dtype)
    calls = {"dense": lambda: F.linear(x, dense_weight, bias)}
    calls.update({f: (lambda layer=layers[f]: layer(x)) for f in formats})
    seconds = _timed_on(device, calls)
    cache.put(key, seconds)
    return Measured(seconds, layers=layers)


def measure_conv(conv, input_shape: tuple[int, ...], cache: TimingCache) -> Measured:
    """Time ``conv`` (an ``nn.Conv2d``) dense against its ``SparseConv2d`` on inputs of
    ``input_shape`` (cached as :func:`measure`'s, keyed by the convolution's geometry and input), on
    the layer's device in its dtype."""
    import copy

    from sparsenet.nn.conv import SparseConv2d

    device, dtype = conv.weight.device, conv.weight.dtype
    on_cuda = device.type == "cuda"
    sparse = SparseConv2d.from_dense(copy.deepcopy(conv).to("cpu", torch.float32) if on_cuda else conv)
    machine = _gpu(device, dtype) if on_cuda else cpu_model()
    # (how many output channels the kernel runs together: csrc/cpu/conv.h, rows_run_together)
    handle = csr_handle(sparse.crow_indices, sparse.col_indices, sparse.values, sparse.packed_shape[1])
    together = handle.rows_run_together()
    key = (f"{machine}|conv{'x'.join(str(v) for v in sparse.geometry)}|input={'x'.join(map(str, input_shape))}"
           f"|{sparse.density:.2f}" + ("" if on_cuda else f"|threads={torch.get_num_threads()}")
           + f"|together={together:.1f}|build={build_tag()}")
    seconds = cache.get(key, ["csr"])
    if seconds is not None:
        return Measured(seconds, cached=True)
    dense = sparse.to_dense_conv()  # the pruned weight as the dense layer computes it
    if on_cuda:
        sparse, dense = sparse.to(device, dtype), dense.to(device, dtype)
    x = torch.randn(*input_shape, device=device, dtype=dtype)
    seconds = _timed_on(device, {"dense": lambda: dense(x), "csr": lambda: sparse(x)})
    cache.put(key, seconds)
    return Measured(seconds, layers={"csr": sparse})
