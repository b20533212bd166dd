"""Time, peak memory and output error of one-shot pruning + reconstruction on a BERT-base stack.

    python benchmarks/reconstruction_bert.py                  # the recorded run (about 20 minutes)
    python benchmarks/reconstruction_bert.py --layers 1 --hidden 64 --ffn 128 --heads 2 --seqs 8 --seq-len 16

The model is Hugging Face's ``BertModel`` built from a config (random weights, nothing
downloaded, no pooler): 12 layers, hidden 768, FFN 3072, 12 heads. Calibration: ``--seqs``
random token sequences of ``--seq-len`` in batches of ``--calib-batch``; the output error is
measured on 16 other sequences: mean over tokens of 1 - cos between the pruned and the dense
model's last hidden state. Every Linear of the encoder is pruned to ``--sparsity``.

Each method runs in a fresh subprocess (peak memory is then its own): ``peak`` is the process's
whole resident high-water mark, model and data included, which is what must fit in 8 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from memory import RU_MAXRSS_NOTE, PeakMeter, run_isolated

# name -> (kind, keyword arguments); "sparsegpt" is the paper's recipe, "sparsenet" the defaults.
METHODS = {
    "magnitude": ("prune", {"criterion": "magnitude"}),
    "wanda": ("prune", {"criterion": "wanda"}),
    "sparsegpt": ("reconstruct", {"method": "sparsegpt", "blockwise": False, "correct": False,
                                  "within_stage": "parallel", "damp": 0.01}),
    "admm": ("reconstruct", {"method": "admm", "blockwise": False}),
    "sparsenet": ("reconstruct", {}),
}
TIME_TARGETS = {"sparsegpt": 180.0, "sparsenet": 900.0}
PEAK_TARGET = 8 * 2**30


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertModel

    import sparsenet

    torch.manual_seed(0)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.ffn,
                        attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, config.vocab_size, (args.seqs + 16, args.seq_len))
    calib = [{"input_ids": ids[i:i + args.calib_batch]} for i in range(0, args.seqs, args.calib_batch)]
    held = ids[args.seqs:]
    with torch.no_grad():
        reference = model(input_ids=held).last_hidden_state
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    kind, kwargs = METHODS[args.method]
    meter = PeakMeter()
    meter.start()
    start = time.perf_counter()
    if kind == "prune":
        data = calib if kwargs["criterion"] != "magnitude" else None
        sparsenet.prune(model, args.sparsity, calib=data, progress=False, **kwargs)
    else:
        sparsenet.reconstruct(model, calib, args.sparsity, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    meter.stop()
    with torch.no_grad():
        out = model(input_ids=held).last_hidden_state
    err = float((1 - F.cosine_similarity(out, reference, dim=-1)).mean())
    return {"method": args.method, "seconds": seconds, "peak": meter.peak, "extra": meter.extra,
            "exact": meter.exact, "model_bytes": model_bytes, "error": err,
            "threads": torch.get_num_threads()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seqs", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--method", help=argparse.SUPPRESS)  # set in the worker subprocesses
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.method is not None:
        print(json.dumps(worker(args)))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = run_isolated(__file__, passthrough, "--method", args.methods,
                           lambda method, r: print(f"  {method}: {r['seconds']:.1f} s", file=sys.stderr))
    if results is None:
        return 1

    gib = lambda b: b / 2**30  # noqa: E731
    r0 = results[0]
    print(f"BertModel: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads, "
          f"{gib(r0['model_bytes']):.2f} GiB; every encoder Linear at {args.sparsity:.0%}; calibration "
          f"{args.seqs} x {args.seq_len} tokens in batches of {args.calib_batch}; torch threads "
          f"{r0['threads']}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| method | time (s) | target | peak memory (GiB) | extra over model+data (GiB) | "
          "output 1 - cos (held-out) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        target = TIME_TARGETS.get(r["method"])
        mark = "" if target is None else (" (met)" if r["seconds"] < target else " (MISSED)")
        print(f"| {r['method']} | {r['seconds']:.1f} | {'-' if target is None else f'< {target:.0f}'}{mark} | "
              f"{gib(r['peak']):.2f} | {gib(r['extra']):.2f} | {r['error']:.2e} |")
    if not all(r["exact"] for r in results):
        print(RU_MAXRSS_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
