"""sparsenet's CUDA kernels against cuBLAS dense (F.linear) and torch's sparse paths, float16,
LLaMA-7B MLP shapes (11008x4096, 4096x11008) and 4096x4096: CSR and bitmap on unstructured sparsity at
batch 1-64 (against torch's cuSPARSE CSR), and BSR on 32x32 blocks at 90% at batch 256 and 2048
(against torch's BSR matmul), and N:M on 2:4 at batch 16 and 2048 (against torch's semi-structured
path).

    python3 benchmarks/gpu/bench_cuda.py [--sparsities 0.9,0.7,0.5] [--batches 1,4,16,64] [--parts small,bsr,nm]

Each contender runs over enough copies of its weight that together they exceed the L2 cache four
times over (so weights come from HBM), timed by replaying a CUDA graph of those calls (events around
the replay; median of repeats; a contender that cannot be captured is timed by events around a loop,
and marked). Prints, per cell: each contender's time, the faster sparsenet format's speedup over
dense and over cuSPARSE (same run), and the bandwidth it reached (bytes it must read: values,
structure, input, output; over its time), with the GPU. The BSR table gives TFLOP/s (stored blocks'
multiply-adds over time).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
import torch.nn.functional as F

from sparsenet.nn import SparseLinear

SHAPES = [(11008, 4096), (4096, 11008), (4096, 4096)]


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "L2_cache_size", 0) or 64 * 2**20


def copies_for(bytes_each: int) -> int:
    return max(2, -(-4 * l2_bytes() // max(bytes_each, 1)))


def time_ms(calls, repeats: int = 7, loops: int = 10) -> tuple[float, str]:
    """Median ms per call, and how it was timed: replays of a CUDA graph of `loops` passes over
    `calls` (one per weight copy), so host overhead and launch gaps stay out; where a contender
    cannot be captured (a library that synchronises), event-timed loops of the same calls."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    n = loops * len(calls)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                calls[i % len(calls)]()
        run, how = graph.replay, "graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for i in range(n):
                calls[i % len(calls)]()
        how = "events"
    run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n)
    return statistics.median(samples), how


def cpu_linear(weight: torch.Tensor) -> torch.nn.Linear:
    """A float32 CPU nn.Linear holding `weight` (what sparsenet's formats are built from)."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight.float().cpu())
    return lin


def time_peer(name: str, calls) -> tuple[float, str]:
    """time_ms of a peer's calls; NaN and a printed reason where this torch build cannot run them."""
    if calls is None:
        return float("nan"), " (failed)"
    try:
        ms, how = time_ms(calls)
    except RuntimeError as error:
        print(f"{name} path failed: {error}", flush=True)
        return float("nan"), " (failed)"
    return ms, "" if how == "graph" else " (events)"


def block_pruned(out_f: int, in_f: int, block: int, sparsity: float, dtype) -> torch.Tensor:
    keep = torch.rand(out_f // block, in_f // block, device="cuda") >= sparsity
    weight = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
    return weight * keep.repeat_interleave(block, 0).repeat_interleave(block, 1).to(dtype)


def bsr_table(batches=(256, 2048), block: int = 32, sparsity: float = 0.9) -> None:
    dtype = torch.float16
    print(f"\n{block}x{block} blocks, {sparsity:.0%} of them empty, float16")
    print("| weight | batch | dense us | torch BSR us | sparsenet BSR us | vs dense | vs torch BSR | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        weight = block_pruned(out_f, in_f, block, sparsity, dtype)
        layer = SparseLinear.from_dense(cpu_linear(weight), format="bsr", block=(block, block)).to("cuda", dtype)
        layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(layer.nnz * 2) - 1)]
        dense_w = [weight.clone() for _ in range(copies_for(weight.numel() * 2))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_bsr = [weight.to_sparse_bsr((block, block)) for _ in layers]
        for batch in batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
            xt = x.T.contiguous()
            with torch.inference_mode():
                torch.testing.assert_close(layer(x).float(), F.linear(x, weight).float(), rtol=2e-2, atol=1e-1)
                dense_ms, _ = time_ms([lambda w=w: F.linear(x, w) for w in dense_w])
                torch_ms, note = time_peer("torch BSR", [lambda b=b: torch.sparse.mm(b, xt) for b in torch_bsr])
                ours_ms, _ = time_ms([lambda m=m: m(x) for m in layers])
            tflops = 2 * batch * layer.nnz / ours_ms / 1e9
            print(f"| {out_f}x{in_f} | {batch} | {1e3 * dense_ms:.1f} | {1e3 * torch_ms:.1f}{note} | "
                  f"{1e3 * ours_ms:.1f} | {dense_ms / ours_ms:.2f}x | {torch_ms / ours_ms:.2f}x | {tflops:.0f} |",
                  flush=True)


def nm_table(batches=(16, 2048)) -> None:
    dtype = torch.float16
    print("\n2:4, float16")
    print("| weight | batch | dense us | torch 2:4 us | sparsenet N:M us | vs dense | vs torch 2:4 |")
    print("|---|---|---|---|---|---|---|")
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
        weight.view(out_f, in_f // 4, 4)[..., 2:] = 0  # 2 of every 4
        layer = SparseLinear.from_dense(cpu_linear(weight), format="nm").to("cuda", dtype)
        layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(layer.nnz * 2) - 1)]
        dense_w = [weight.clone() for _ in range(copies_for(weight.numel() * 2))]
        try:
            semi = [torch.sparse.to_sparse_semi_structured(weight.clone()) for _ in layers]
        except (RuntimeError, AttributeError) as error:
            print(f"torch 2:4 path unavailable: {error}", flush=True)
            semi = None
        for batch in batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
            with torch.inference_mode():
                torch.testing.assert_close(layer(x).float(), F.linear(x, weight).float(), rtol=2e-2, atol=1e-1)
                dense_ms, _ = time_ms([lambda w=w: F.linear(x, w) for w in dense_w])
                torch_ms, note = time_peer("torch 2:4", semi and [lambda w=w: F.linear(x, w) for w in semi])
                ours_ms, _ = time_ms([lambda m=m: m(x) for m in layers])
            print(f"| {out_f}x{in_f} | {batch} | {1e3 * dense_ms:.1f} | {1e3 * torch_ms:.1f}{note} | {1e3 * ours_ms:.1f} | "
                  f"{dense_ms / ours_ms:.2f}x | {torch_ms / ours_ms:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.9,0.7,0.5")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--parts", default="small,bsr,nm")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name(0)}, L2 {l2_bytes() / 2**20:.0f} MiB, torch {torch.__version__}")
    if "small" in args.parts:
        small_batch_table(args)
    if "bsr" in args.parts:
        bsr_table()
    if "nm" in args.parts:
        nm_table()


def small_batch_table(args) -> None:
    dtype = torch.float16
    print("\nunstructured, float16")
    print("| weight | sparsity | batch | dense us | cuSPARSE us | csr us | bitmap us | best vs dense | "
          "best vs cuSPARSE | best GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in SHAPES:
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            torch.manual_seed(0)
            weight = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
            weight[torch.rand_like(weight, dtype=torch.float32) < sparsity] = 0
            lin = cpu_linear(weight)
            dense_w = [weight.clone() for _ in range(copies_for(weight.numel() * 2))]
            formats = {}
            for fmt in ("csr", "bitmap"):
                layer = SparseLinear.from_dense(lin, format=fmt).to("cuda", dtype)
                structure = sum(t.numel() * t.element_size() for t in layer.buffers())
                weight_bytes = structure + layer.nnz * 2
                formats[fmt] = ([layer] + [copy.deepcopy(layer) for _ in range(copies_for(weight_bytes) - 1)],
                                weight_bytes)
            with warnings.catch_warnings():  # torch's CSR: as many copies as sparsenet's CSR has
                warnings.simplefilter("ignore")
                csr = [weight.to_sparse_csr() for _ in formats["csr"][0]]
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
                xt = x.T.contiguous()
                ms, moved = {}, {}
                with torch.inference_mode():
                    ms["dense"], _ = time_ms([lambda w=w: F.linear(x, w) for w in dense_w])
                    ms["cusparse"], note = time_peer("cuSPARSE", [lambda c=c: torch.sparse.mm(c, xt) for c in csr])
                    for fmt, (layers, weight_bytes) in formats.items():
                        torch.testing.assert_close(layers[0](x).float(), F.linear(x, weight).float(), rtol=2e-2,
                                                   atol=5e-2)
                        ms[fmt], _ = time_ms([lambda m=m: m(x) for m in layers])
                        moved[fmt] = weight_bytes + batch * (in_f + out_f) * 2
                best = min(formats, key=lambda f: ms[f])
                print(f"| {out_f}x{in_f} | {sparsity:.0%} | {batch} | {1e3 * ms['dense']:.1f} | "
                      f"{1e3 * ms['cusparse']:.1f}{note} | {1e3 * ms['csr']:.1f} | {1e3 * ms['bitmap']:.1f} | "
                      f"{ms['dense'] / ms[best]:.2f}x ({best}) | {ms['cusparse'] / ms[best]:.2f}x | "
                      f"{moved[best] / ms[best] / 1e6:.0f} |", flush=True)

if __name__ == "__main__":
    main()
