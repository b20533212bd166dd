"""A/B of two builds of the native module in one process, call by call: did a change to csrc/ make a
layer slower?

Timing two builds in separate processes compares two machine states as much as two builds (on the
shared 2-core machines here, process-to-process medians of one build varied by 10-30%). Both
modules are loaded into one process instead (the baseline under another package name), given the
same weights, and called alternately, each from its own rotation of weight copies that exceed the
last-level cache twice over, so every call reads its weight from DRAM.

    cp build/<tag>/_C*.so /tmp/base_C.so      # the baseline build, before the change
    # ... rebuild with the change ...
    python benchmarks/ab_native.py /tmp/base_C.so --batch 1 64
    python benchmarks/ab_native.py /tmp/base_C.so --format nm --nm 2:4 --isa avx2   # (csr, bitmap, nm, bsr)
    python benchmarks/ab_native.py /tmp/base_C.so --format bsr --block 16x16 --sparsity 0.7 --batch 1024
    python benchmarks/ab_native.py /tmp/base_C.so --distinct --shape 768 768 --sparsity 0.7 --batch 32

--distinct gives every copy its own random weight: with copies of one weight a small weight's
branches (its rows' lengths) repeat call after call and the branch predictor learns them, which a
model's many different layers do not allow (BENCHMARKS.md, seventh stop on Zen 3).

Prints the median time per call of each build and their ratio (new / baseline), with the CPU.
Measures the native call only (DLPack in, DLPack out); Python-side changes need a separate look.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

import sparsenet
from sparsenet import _C as new_C
from sparsenet.formats import hugepages, registry

from formats_table import kept
from machine import cpu_name, last_level_cache_bytes


def load_baseline(path: str):
    # The extension's init function is named after the last component of the module name: "_C".
    spec = importlib.util.spec_from_file_location("sparsenet_baseline._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # What the package hands its own module at import (sparsenet/ops/runtime.py), handed to this one
    # too where it takes it: without the cache size a build plans as if it had none (no streamed
    # convolution outputs), and an A/B then compares plans, not code.
    if hasattr(module, "set_last_level_cache_bytes"):
        module.set_last_level_cache_bytes(new_C.last_level_cache_bytes())
    return module


# Each format's native handle and the structure tensor that streams beside the values.
_HANDLES = {"csr": ("CsrHandle", "crow_indices", "col_indices"), "bitmap": ("BitmapHandle", "row_ptr", "masks"),
            "nm": ("NmHandle", "pattern", "indices"), "bsr": ("BsrHandle", "block_ptr", "block_cols")}


def handles(module, packs, bias: torch.Tensor):
    """A handle over its own copy of each packed weight in `packs` (keep=True: it holds it), structure
    stream and values in one huge-page region each, so neither build is handed slower memory."""
    made = []
    for packed in packs:
        out_features, in_features = packed.shape
        kind, offsets, stream = _HANDLES[packed.FORMAT]
        tensors = packed.tensors()
        streamed, values = hugepages.copy_group([tensors[stream], packed.values])
        structure = {name: tensors[name].clone().numpy() for name in packed.STRUCTURE}  # (bsr: its block shape too)
        structure[stream] = streamed.numpy()
        ordered = [structure[name] for name in packed.STRUCTURE]
        made.append(getattr(module, kind)(out_features, in_features, *ordered, values.numpy(), True,
                                          bias.clone().numpy()))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="path of the baseline build's _C*.so")
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("OUT", "IN"))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--nm", default="2:4", metavar="N:M", help="the pattern kept with --format nm (not --sparsity)")
    parser.add_argument("--format", default="csr", choices=sorted(_HANDLES))
    parser.add_argument("--block", type=lambda v: tuple(int(n) for n in v.split("x")), default=(16, 16), metavar="RxC",
                        help="the block shape with --format bsr, whole blocks kept or pruned")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=min(2, sparsenet.ops.runtime.usable_threads()))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--isa", default=None, help="the kernel family both builds run (default: the best)")
    parser.add_argument("--distinct", action="store_true",
                        help="a different random weight for each copy: calls that repeat one small weight's "
                             "structure let the branch predictor learn its rows' lengths, which a model's many "
                             "different layers do not")
    args = parser.parse_args()

    base_C = load_baseline(args.baseline)
    torch.set_num_threads(args.threads)
    for module in (base_C, new_C):
        module.set_num_threads(args.threads)
        if args.isa:  # (on both: SPARSENET_ISA is read by the package, which the baseline is loaded without)
            module.set_isa(args.isa)
    g = torch.Generator().manual_seed(0)
    out_features, in_features = args.shape
    nm = tuple(int(v) for v in args.nm.split(":")) if args.format == "nm" else None
    if nm:
        args.sparsity = 1 - nm[0] / nm[1]
    block = args.block if args.format == "bsr" else None

    def pruned():
        return torch.randn(out_features, in_features, generator=g) * kept(args.shape, args.sparsity, block, g, nm)

    def pack(w):
        return registry.get(args.format).from_dense(w, **({"block": block} if block else {}))

    weights = [pruned()]
    bias = torch.randn(out_features)
    packs = [pack(weights[0])]
    weight_bytes = packs[0].nbytes
    copies = max(2, -(-2 * last_level_cache_bytes() // weight_bytes))
    if args.distinct:
        weights += [pruned() for _ in range(copies - 1)]
        packs += [pack(w) for w in weights[1:]]
    else:
        packs *= copies  # (each handle copies the packed buffers it is given)
    contenders = {"baseline": handles(base_C, packs, bias), "new": handles(new_C, packs, bias)}
    print(f"{cpu_name()}, {args.threads} threads; {out_features}x{in_features} at {args.sparsity:.0%} "
          f"sparsity, {args.format}, {weight_bytes / 2**20:.1f} MiB per weight, {copies} "
          f"{'distinct weights' if args.distinct else 'copies'} per build")
    for batch in args.batch:
        x = torch.randn(batch, in_features)
        references = [x.double() @ w.double().T + bias.double() for w in weights]
        times = {name: [] for name in contenders}
        for r in range(args.rounds):
            for i in range(copies):
                order = ("baseline", "new") if (r + i) % 2 else ("new", "baseline")
                for name in order:
                    start = time.perf_counter()
                    y = from_dlpack(contenders[name][i].forward(to_dlpack(x)))
                    times[name].append(time.perf_counter() - start)
                    if r == 0:  # once per handle: the timed rounds stay free of other work
                        reference = references[i % len(references)]
                        err = ((y.double() - reference).abs().max() / reference.abs().max()).item()
                        assert err < 1e-4, f"{name} disagrees with the float64 reference: {err:.1e}"
        base, new = (statistics.median(times[n]) * 1e6 for n in ("baseline", "new"))
        print(f"batch {batch:>4}: baseline {base:9.1f} us, new {new:9.1f} us, new / baseline {new / base:.3f}")


if __name__ == "__main__":
    main()
