"""Dense vs every registered sparse format, side by side: time per call, speedup over dense, and how
close each format comes to its own byte limit (the bytes it must read / the measured read bandwidth).

    python benchmarks/formats_table.py [--shapes 4096x4096] [--sparsities 0.5,0.7,0.9] [--batches 1,8,64]
                                       [--block 16x16 | --nm 2:4]

With --block, weights are pruned in whole blocks of that shape (random blocks kept); with --nm, N of
every M consecutive weights of a row are kept (random ones; --sparsities is then ignored). Every
format that fits such a weight (BSR, N:M too) is measured; without either, weights are unstructured.

Each contender rotates through enough independent copies of its weight to exceed twice the
last-level cache (read from the machine), so every call reads from DRAM; contenders are interleaved
call by call with the bandwidth probe's reads among them, medians reported. Names the CPU.

With --reads, each format also gets a plain read of as many bytes as it stores (torch.sum over
rotated huge-page buffers of that size, called like the layers): the share of the byte limit that a
read of those bytes alone reaches under the same conditions (a call's fixed cost, its threads'
start, a read of tens of MB rather than the probe's hundreds), beside the format's own.

With --kernels, each format's native kernel is also timed alone: the same layers' prepared handles
called directly (DLPack in and out, as the module's forward does), without the module's Python
forward. The byte limit is a statement about the kernel; a layer's time adds the forward's fixed
cost, which after every other contender's sweep of the caches is ~0.1-0.15 ms (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import ReadProbe, Rotation, _copies, interleaved_medians, set_threads  # noqa: E402
from machine import cpu_label  # noqa: E402

from torch.utils.dlpack import from_dlpack, to_dlpack  # noqa: E402

from sparsenet.formats import hugepages, registry  # noqa: E402
from sparsenet.nn import SparseLinear  # noqa: E402


def layer(weight: torch.Tensor, fmt: str) -> SparseLinear:
    dense = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        dense.weight.copy_(weight)
    return SparseLinear.from_dense(dense, format=fmt)


def kept(shape, sparsity: float, block, g: torch.Generator, nm=None) -> torch.Tensor:
    """Which entries survive: each on its own, whole blocks (block = (r, c)) or N of every M (nm)."""
    if nm is not None:
        n, m = nm
        order = torch.rand(shape[0], shape[1] // m, m, generator=g).argsort(dim=-1)
        return (order < n).reshape(shape)
    r, c = block or (1, 1)
    keep = torch.rand(-(-shape[0] // r), -(-shape[1] // c), generator=g) >= sparsity
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:shape[0], :shape[1]]


def plain_reads(nbytes: int, count: int) -> Rotation:
    """`count` huge-page buffers of `nbytes`, each summed in turn: a read of a weight's bytes alone."""
    return Rotation([hugepages.empty_group([(max(nbytes // 4, 1), torch.float32)])[0].fill_(1.0)
                     for _ in range(count)])


def cell(shape, sparsity: float, batches, rounds: int, probe: ReadProbe, formats, block=None, nm=None,
         reads: bool = False, kernels: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    dense_bytes = 4 * shape[0] * shape[1]
    weights = [torch.randn(*shape, generator=g) * kept(shape, sparsity, block, g, nm)
               for _ in range(_copies(dense_bytes))]
    rotations = {"dense": Rotation(weights)}
    stored = {"dense": dense_bytes}
    for fmt in formats:
        first = layer(weights[0], fmt)
        stored[fmt] = first.to_packed().nbytes
        count = _copies(stored[fmt])
        rotations[fmt] = Rotation([first] + [layer(weights[i % len(weights)], fmt) for i in range(1, count)])
        if reads:
            rotations[f"read {fmt}"] = plain_reads(stored[fmt], count)
            stored[f"read {fmt}"] = stored[fmt]
    rows = []
    for batch in batches:
        x = torch.randn(batch, shape[1], generator=g)
        calls = {"dense": lambda: F.linear(x, rotations["dense"].next())}
        calls.update({fmt: (lambda r=rotations[fmt]: r.next()(x)) for fmt in formats})
        if reads:
            calls.update({f"read {fmt}": (lambda r=rotations[f"read {fmt}"]: r.next().sum()) for fmt in formats})
        reference = F.linear(x.double(), weights[0].double())
        for fmt in formats:
            got = rotations[fmt].items[0](x).double()
            assert (got - reference).abs().max() <= 1e-4 * reference.abs().max().clamp_min(1), fmt
        for fmt in formats:
            for item in rotations[fmt].items:
                item(x)  # every layer once: its first call prepares its handle (and any derived copy)
        if kernels:
            for fmt in formats:
                handles = Rotation([item.__dict__["_prepared"].handle for item in rotations[fmt].items])
                calls[f"kernel {fmt}"] = lambda h=handles: from_dlpack(h.next().forward(to_dlpack(x)))
                stored[f"kernel {fmt}"] = stored[fmt]
        for fn in calls.values():
            for _ in range(max(len(r.items) for r in rotations.values())):
                fn()
        # The probe's reads take their turn among the contenders' calls, so that the limit's bandwidth
        # is measured in the same moments as the times it divides (this VM's read bandwidth moved
        # between 26 and 42 GB/s from minute to minute; probed before the rounds instead, CSR came out
        # at up to 110% of its limit). Every contender reads its weights from DRAM anyway, so the
        # probe's sweep of the caches costs them nothing they were not paying.
        t = interleaved_medians({**calls, "read probe": probe.read}, rounds)
        bandwidth = probe.BYTES / t.pop("read probe")
        io = 4 * batch * (shape[0] + shape[1])  # x read, y written
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "sparsity": sparsity, "batch": batch, "bandwidth": bandwidth,
                     **{f"{n}_ms": v * 1e3 for n, v in t.items()},
                     **{f"{n}_of_limit": (stored[n] + (0 if n.startswith("read ") else io)) / bandwidth / t[n]
                        for n in t}})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,1536x384,384x1536")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=lambda s: tuple(int(v) for v in s.split("x")), metavar="RxC",
                        help="prune in whole r x c blocks (default: every entry on its own)")
    parser.add_argument("--nm", type=lambda s: tuple(int(v) for v in s.split(":")), metavar="N:M",
                        help="keep N of every M consecutive weights of a row")
    parser.add_argument("--kernels", action="store_true",
                        help="also time each format's native kernel alone (its prepared handle, without "
                             "the module's Python forward), against the same byte limit")
    parser.add_argument("--reads", action="store_true",
                        help="also time a plain read of each format's bytes (torch.sum), the share of the "
                             "byte limit a read alone reaches here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    probe = ReadProbe()
    if args.nm:
        args.sparsities = str(1 - args.nm[0] / args.nm[1])
    sample = kept((64, 64), 0.5, args.block, torch.Generator().manual_seed(0), args.nm)
    formats = registry.fitting(sample)  # (BSR only for weights pruned in blocks)
    print(f"{cpu_label()}, {args.threads} threads; {'%dx%d blocks' % args.block if args.block else '%d:%d' % args.nm if args.nm else 'unstructured'}; median of {args.rounds} interleaved calls; weights rotated past "
          f"twice the last-level cache; limit = (stored bytes + x + y) / read bandwidth (torch.sum over "
          f"{ReadProbe.BYTES / 2**20:.0f} MiB, interleaved with the calls)")
    header = ["shape", "sparsity", "batch", "dense ms"] + [f"{f} ms" for f in formats] + \
        [f"{f} vs dense" for f in formats] + [f"{f} % of byte limit" for f in formats]
    if args.kernels:
        header += [f"{f} kernel alone, % of limit" for f in formats]
    if args.reads:
        header += [f"read of {f}'s bytes, % of limit" for f in formats]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    with torch.inference_mode():
        for shape in shapes:
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                for r in cell(shape, sparsity, [int(b) for b in args.batches.split(",")], args.rounds, probe, formats,
                              args.block, args.nm, args.reads, args.kernels):
                    values = [r["shape"], f"{r['sparsity']:.0%}", str(r["batch"]), f"{r['dense_ms']:.3f}"]
                    values += [f"{r[f + '_ms']:.3f}" for f in formats]
                    values += [f"{r['dense_ms'] / r[f + '_ms']:.2f}x" for f in formats]
                    values += [f"{r[f + '_of_limit']:.0%}" for f in formats]
                    if args.kernels:
                        values += [f"{r['kernel ' + f + '_of_limit']:.0%}" for f in formats]
                    if args.reads:
                        values += [f"{r['read ' + f + '_of_limit']:.0%}" for f in formats]
                    print("| " + " | ".join(values) + " |", flush=True)


if __name__ == "__main__":
    main()
