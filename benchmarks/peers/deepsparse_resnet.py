"""sparsenet against DeepSparse 1.8 on a ResNet-18 (benchmarks/shrink_resnet.py's, random weights,
224x224) with its convolutions pruned, unstructured and in blocks of 4 output channels: dense torch,
sparsenet (``sparsify()`` with its defaults and the example input) and DeepSparse (the same pruned
model exported to ONNX) interleaved in one process on the same threads.

DeepSparse is never a dependency of sparsenet: it lives in its own venv (see README.md here).

    benchmarks/peers/.venv-deepsparse/bin/python benchmarks/peers/deepsparse_resnet.py [--sparsity 0.8] [--batches 1,8]

Prints the CPU, then per structure and batch the median time per forward of each and the speedups over
dense, after checking that all three agree.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from deepsparse_mlp import deepsparse_engine, timed  # noqa: E402 (this script's folder)
from machine import cpu_label  # noqa: E402
from shrink_resnet import ResNet18  # noqa: E402

import sparsenet  # noqa: E402

STRUCTURES = {"unstructured": {}, "4x1 blocks": {"structure": "block", "block": (4, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsenet.set_num_threads(args.threads)
    print(f"{cpu_label()}, {args.threads} threads (DeepSparse num_cores={args.threads}); ResNet-18 at 224x224, its "
          f"convolutions pruned {args.sparsity:.0%} (magnitude, layer-wise); median of {args.rounds} interleaved "
          "forwards")
    print("| convolutions | batch | dense ms | sparsenet ms | DeepSparse ms | sparsenet vs dense | "
          "DeepSparse vs dense |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, structure in STRUCTURES.items():
            torch.manual_seed(0)
            dense = ResNet18().eval()
            sparsenet.prune(dense, args.sparsity, exclude=["fc"], progress=False, **structure).finalize()
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, 224, 224)
                sparse, _ = sparsenet.sparsify(dense, example_inputs=x)
                engine = deepsparse_engine(dense, torch.randn(batch, 3, 224, 224), args.threads,
                                           os.path.join(folder, f"resnet_b{batch}.onnx"))
                x_np = [np.ascontiguousarray(x.numpy())]
                with torch.inference_mode():
                    want = dense(x)
                    for who, got in (("sparsenet", sparse(x)), ("deepsparse", torch.from_numpy(engine(x_np)[0]))):
                        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                        assert err < 1e-3, (who, err)
                    t = timed({"dense": lambda: dense(x), "sparsenet": lambda: sparse(x),
                               "deepsparse": lambda: engine(x_np)}, args.rounds)
                print(f"| {name} | {batch} | {t['dense'] * 1e3:.1f} | {t['sparsenet'] * 1e3:.1f} | "
                      f"{t['deepsparse'] * 1e3:.1f} | {t['dense'] / t['sparsenet']:.2f}x | "
                      f"{t['dense'] / t['deepsparse']:.2f}x |", flush=True)
                del engine


if __name__ == "__main__":
    main()
