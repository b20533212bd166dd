"""End to end: a BERT-base-shaped encoder (transformers' BertConfig defaults, random weights), its
Linear layers magnitude-pruned, converted by ``sparsify()`` with its defaults (format="auto") at the
rows each batch runs, timed against the dense pruned model, interleaved in one process.

    python benchmarks/sparsify_bert.py [--sparsities 0.5,0.7] [--batches 1,32] [--tokens 128]

Prints, per sparsity and batch, the dense and sparse forward times, the speedup, and which formats
the automatic choice took (and how many layers stayed dense). Names the CPU.
"""
from __future__ import annotations

import argparse
import collections
import copy

import torch

import sparsenet
from machine import cpu_label
from shrink_bert import timed


def encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()  # 12 layers, hidden 768, FFN 3072, 12 heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsenet.set_num_threads(args.threads)
    print(f"{cpu_label()}, {args.threads} threads; BERT-base encoder, {args.tokens} tokens per sequence; "
          f"every Linear layer (72 in the encoder, the pooler) magnitude-pruned per layer; median of {args.rounds}")
    print("| sparsity | batch | dense ms | sparsify() ms | speedup | formats chosen |")
    print("|---|---|---|---|---|---|")
    base = encoder()
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        dense = sparsenet.prune(copy.deepcopy(base), sparsity, scope="layer", progress=False).finalize()
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(0, 30000, (batch, args.tokens), generator=torch.Generator().manual_seed(batch))
            x = {"input_ids": ids}
            sparse, report = sparsenet.sparsify(dense, rows=batch * args.tokens)
            chosen = collections.Counter(r.format for r in report.rows)
            with torch.inference_mode():
                err = (sparse(**x).last_hidden_state - dense(**x).last_hidden_state).abs().max().item()
            assert err < 1e-2, err
            t_dense, t_sparse = timed(dense, x, args.rounds, sparse)
            formats = ", ".join(f"{n} {f}" for f, n in sorted(chosen.items()))
            print(f"| {sparsity:.0%} | {batch} | {t_dense * 1e3:.1f} | {t_sparse * 1e3:.1f} | "
                  f"{t_dense / t_sparse:.2f}x | {formats} |", flush=True)
            del sparse


if __name__ == "__main__":
    main()
