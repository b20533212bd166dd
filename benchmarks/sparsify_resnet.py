"""A ResNet-18-style network (random weights, 224x224) with its convolutions pruned unstructured,
converted by ``sparsify()`` with its defaults (format="auto", the example input given so each
convolution is timed at its size), timed against the dense model.

    python benchmarks/sparsify_resnet.py [--sparsity 0.8] [--batches 1,8] [--rounds 10] [--block 4x1]

--block RxC prunes with ``structure="block"`` in blocks of R output channels x C weight columns
(the default is unstructured); blocks of 4 output channels run 4 rows at a time in the kernel.

The network is shrink_resnet.py's (torchvision has no CPU wheel for the torch used here). Dense and
sparse forwards are interleaved in one process, medians reported; NCHW float32, eval mode. Prints the
sparsify report's choices and the CPU.
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch import nn

import sparsenet
from machine import cpu_label
from shrink_bert import timed
from shrink_resnet import ResNet18


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", default=None, help="RxC: prune in blocks of R output channels x C columns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsenet.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = ResNet18().eval()
    convs = [name for name, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    block = tuple(int(v) for v in args.block.split("x")) if args.block else None
    sparsenet.prune(dense, sparsity=args.sparsity, exclude=["fc"], progress=False,
                    **({"structure": "block", "block": block} if block else {})).finalize()
    print(f"{cpu_label()}, {args.threads} threads; ResNet-18 at 224x224, its {len(convs)} convolutions pruned "
          f"{args.sparsity:.0%} {f'in {block[0]}x{block[1]} blocks' if block else 'unstructured'} (magnitude, layer-wise)")
    print("| batch | dense ms | sparsify() ms | speedup | layers converted |\n|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, 224, 224)
        sparse, report = sparsenet.sparsify(dense, example_inputs=x)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), dense(x), rtol=1e-3, atol=1e-3)
        t_dense, t_sparse = timed(dense, {"pixel_values": x}, args.rounds, sparse)
        chosen = collections.Counter(r.format for r in report.rows)
        print(f"| {batch} | {1e3 * t_dense:.1f} | {1e3 * t_sparse:.1f} | {t_dense / t_sparse:.2f}x | "
              f"{', '.join(f'{n} {f}' for f, n in sorted(chosen.items()))} |", flush=True)


if __name__ == "__main__":
    main()
