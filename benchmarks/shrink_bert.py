"""Shrink a BERT-base-sized encoder (random weights) to half its encoder-layer parameters and time it.

    python benchmarks/shrink_bert.py [--layers 12] [--hidden 768] [--ffn 3072] [--sequences 128]
                                     [--tokens 128] [--importance magnitude] [--rounds 10]

Prints the time and peak memory of the whole ``sparsenet.shrink`` call (trace, scoring, removal,
refit on the calibration data), then the forward time of the dense and the shrunk model at batch 1
and 32 (one sequence of ``--tokens`` tokens per sample), interleaved round by round in one process,
with the multiply-adds of each so the speedup can be read against the work removed. Names the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import sparsenet
from memory import PeakMeter
from machine import cpu_name


def encoder(layers: int, hidden: int, ffn: int, heads: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                        num_attention_heads=heads, vocab_size=30522)
    return BertModel(config, add_pooling_layer=False).eval()


def encoder_layer_params(model) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


def timed(model, batch, rounds: int, other=None):
    """Median seconds per forward of ``model`` (and of ``other``, interleaved with it)."""
    times = {0: [], 1: []}
    models = [model] + ([other] if other is not None else [])
    with torch.inference_mode():
        for m in models:
            m(**batch)
        for r in range(rounds):
            for i, m in (enumerate(models) if r % 2 == 0 else reversed(list(enumerate(models)))):
                start = time.perf_counter()
                m(**batch)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(times[i]) for i in range(len(models))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = encoder(args.layers, args.hidden, args.ffn, args.heads)
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(1000, 30000, (args.calib_batch, args.tokens), generator=g)}
             for _ in range(args.sequences // args.calib_batch)]
    before = encoder_layer_params(model)
    meter = PeakMeter()
    meter.start()
    start = time.perf_counter()
    report = sparsenet.shrink(model, calib[0], 0.5, calib=calib, importance=args.importance, progress=False)
    seconds = time.perf_counter() - start
    meter.stop()
    after = encoder_layer_params(model)
    print(report)
    print(f"{cpu_name()}, {args.threads} threads; encoder-layer parameters {before:,} -> {after:,} "
          f"({after / before:.1%}); shrink took {seconds:.0f} s, peak resident memory "
          f"{meter.peak / 2**30:.2f} GiB ({meter.extra / 2**30:.2f} GiB above the start)")
    results = {"cpu": cpu_name(), "seconds": seconds, "peak_gib": meter.peak / 2**30,
               "params_before": before, "params_after": after, "speedup": {}}
    for batch in (1, 32):
        x = {"input_ids": torch.randint(1000, 30000, (batch, args.tokens), generator=g)}
        dense_s, small_s = timed(dense, x, args.rounds, model)
        results["speedup"][batch] = dense_s / small_s
        print(f"batch {batch:>2} x {args.tokens} tokens: dense {dense_s * 1e3:8.1f} ms, shrunk "
              f"{small_s * 1e3:8.1f} ms, speedup {dense_s / small_s:.2f}x (multiply-adds "
              f"{report.macs_after / report.macs_before:.1%} of dense in the traced call)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
