"""sparsenet against DeepSparse 1.8 on the issue's model: an 8-layer 4096x4096 ReLU MLP, magnitude-
pruned, at batch 1 and 64, dense torch beside both, all interleaved in one process on the same
threads.

DeepSparse is never a dependency of sparsenet: it lives in its own venv (see README.md here).

    benchmarks/peers/.venv-deepsparse/bin/python benchmarks/peers/deepsparse_mlp.py [--sparsities 0.5,0.7,0.9]

Prints the CPU, then per sparsity and batch the median time per forward of dense torch, sparsenet
(csr, and format="auto" timed at that batch) and DeepSparse, and the speedups over dense.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from common import interleaved_medians  # noqa: E402
from machine import cpu_label  # noqa: E402

import sparsenet  # noqa: E402


def mlp(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks).eval()


def deepsparse_engine(model: nn.Module, example: torch.Tensor, cores: int, path: str):
    """DeepSparse's engine for ``model`` exported to ONNX at ``path`` on inputs shaped as ``example``
    (its first dimension the batch)."""
    from deepsparse import compile_model

    torch.onnx.export(model, (example,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    return compile_model(path, batch_size=example.shape[0], num_cores=cores)


def timed(calls: dict, rounds: int) -> dict:
    for fn in calls.values():
        fn()
        fn()
    return interleaved_medians(calls, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsenet.set_num_threads(args.threads)
    print(f"{cpu_label()}, {args.threads} threads (DeepSparse num_cores={args.threads}); {args.layers} x "
          f"{args.width}x{args.width} Linear + ReLU, magnitude-pruned per layer; median of {args.rounds} "
          "interleaved forwards")
    print("| sparsity | batch | dense ms | sparsenet csr ms | sparsenet auto ms | DeepSparse ms | csr vs dense | "
          "auto vs dense | DeepSparse vs dense | auto formats |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            dense = sparsenet.prune(mlp(args.width, args.layers), sparsity, scope="layer", progress=False).finalize()
            csr, _ = sparsenet.sparsify(dense, min_sparsity=0.0, format="csr")
            for batch in (int(b) for b in args.batches.split(",")):
                auto, report = sparsenet.sparsify(dense, min_sparsity=0.0, format="auto", rows=batch)
                engine = deepsparse_engine(dense, torch.randn(batch, args.width), args.threads,
                                           os.path.join(folder, f"mlp_b{batch}.onnx"))
                x = torch.randn(batch, args.width)
                x_np = [np.ascontiguousarray(x.numpy())]
                with torch.inference_mode():
                    want = dense(x)
                    for name, got in (("csr", csr(x)), ("auto", auto(x)), ("deepsparse", torch.from_numpy(engine(x_np)[0]))):
                        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                        assert err < 1e-3, (name, err)
                    t = timed({"dense": lambda: dense(x), "csr": lambda: csr(x), "auto": lambda: auto(x),
                               "deepsparse": lambda: engine(x_np)}, args.rounds)
                formats = sorted({r.format for r in report.rows})
                print(f"| {sparsity:.0%} | {batch} | {t['dense'] * 1e3:.2f} | {t['csr'] * 1e3:.2f} | "
                      f"{t['auto'] * 1e3:.2f} | {t['deepsparse'] * 1e3:.2f} | {t['dense'] / t['csr']:.2f}x | "
                      f"{t['dense'] / t['auto']:.2f}x | {t['dense'] / t['deepsparse']:.2f}x | {', '.join(formats)} |",
                      flush=True)
                del engine, auto


if __name__ == "__main__":
    main()
