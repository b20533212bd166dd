"""Time and peak memory of computing masks, per criterion, on a BERT-base-sized model.

    python benchmarks/pruning_pipeline.py                  # the recorded run (a few minutes)
    python benchmarks/pruning_pipeline.py --layers 1 --hidden 64 --ffn 128 --heads 2 --seqs 4 --seq-len 16

The model is Hugging Face's ``BertForSequenceClassification`` built from a config (random
weights, nothing downloaded): 12 layers, hidden 768, FFN 3072, 12 heads, 2 labels. Every
``nn.Linear`` is pruned (``sparsenet.prune``, global scope, 90%); the embeddings are not Linear
and stay. Calibration: 64 random token sequences of length 128, in batches of ``--calib-batch``,
with random labels (Taylor's default cross-entropy uses them).

Each criterion runs in a fresh subprocess, so one run's freed memory never hides another's peak.
Peak memory is the process's resident-set high-water mark (``VmHWM``), reset through
``/proc/self/clear_refs`` once the model and data are built, minus the resident size at that
moment: the extra memory the pruning call itself needed (tracemalloc cannot see torch's
allocations). Where the reset is not allowed, ``ru_maxrss`` is used, which can only over-state.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from memory import RU_MAXRSS_NOTE, PeakMeter, run_isolated

TARGETS = {"magnitude": 2.0, "wanda": 2.0, "taylor": 3.0}  # peak extra memory / model size
TIME_TARGET_S = 60.0


def worker(args: argparse.Namespace) -> dict:
    """One criterion, in this process: build, reset the peak, prune, measure."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import sparsenet

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=args.ffn, num_labels=2, attn_implementation="eager",
    )
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.seqs, args.seq_len))
    labels = torch.randint(0, 2, (args.seqs,))
    calib = [
        {"input_ids": ids[i:i + args.calib_batch], "labels": labels[i:i + args.calib_batch]}
        for i in range(0, args.seqs, args.calib_batch)
    ]
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    linear_bytes = sum(m.weight.numel() * m.weight.element_size()
                       for m in model.modules() if isinstance(m, torch.nn.Linear))

    meter = PeakMeter()
    meter.start()
    start = time.perf_counter()
    pruner = sparsenet.prune(
        model, args.sparsity, criterion=args.criterion, scope="global",
        calib=None if args.criterion == "magnitude" else calib, progress=False,
    )
    seconds = time.perf_counter() - start
    meter.stop()
    return {
        "criterion": args.criterion,
        "seconds": seconds,
        "peak_extra_bytes": meter.extra,
        "model_bytes": model_bytes,
        "linear_bytes": linear_bytes,
        "sparsity": pruner.report().total_sparsity,
        "layers": len(pruner.layers),
        "exact_peak": meter.exact,
        "threads": torch.get_num_threads(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--criteria", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-batch", type=int, default=4)  # Taylor's peak grows with it (BENCHMARKS.md)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--criterion", help=argparse.SUPPRESS)  # set in the worker subprocesses
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.criterion is not None:
        print(json.dumps(worker(args)))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = run_isolated(__file__, passthrough, "--criterion", args.criteria)
    if results is None:
        return 1

    r0 = results[0]
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"BertForSequenceClassification: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, "
          f"{args.heads} heads; {r0['layers']} Linear layers pruned to {args.sparsity:.0%} (global scope)")
    print(f"model {mb(r0['model_bytes']):.0f} MiB (Linear weights {mb(r0['linear_bytes']):.0f} MiB); calibration "
          f"{args.seqs} x {args.seq_len} tokens in batches of {args.calib_batch}; torch threads {r0['threads']}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| criterion | time (s) | target | peak extra memory (MiB) | x model size | target | met |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        ratio = r["peak_extra_bytes"] / r["model_bytes"]
        target = TARGETS[r["criterion"]]
        met = r["seconds"] < TIME_TARGET_S and ratio <= target
        print(f"| {r['criterion']} | {r['seconds']:.1f} | < {TIME_TARGET_S:.0f} | {mb(r['peak_extra_bytes']):.0f} | "
              f"{ratio:.2f}x | <= {target:.0f}x | {'yes' if met else 'NO'} |")
    if not all(r["exact_peak"] for r in results):
        print(RU_MAXRSS_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
