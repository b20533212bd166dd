"""The ``sparsenet`` command: ``sparsenet demo`` and ``sparsenet info``.

Subcommands (``sparsenet COMMAND ...``) so more can join later. torch and sparsenet are imported only
inside the commands, so ``--help`` and option errors answer at once.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

# Sizes for the full demo and for --quick (tests, CI): explicit options override either.
FULL = {"hidden": 4096, "layers": 3, "batch": [1, 64], "rounds": 20, "epochs": 20, "finetune_epochs": 5}
QUICK = {"hidden": 256, "layers": 2, "batch": [1, 64], "rounds": 3, "epochs": 10, "finetune_epochs": 3}
# Sparse and dense outputs are the same sums in another order: float32 rounding only.
AGREE_TOL = 1e-4


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = f"int>={low}"  # what argparse names in its own messages
    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsenet")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsenet",
        description="Prune PyTorch models and run the pruned layers with native sparse CPU kernels.",
    )
    parser.add_argument("--version", action="version", version=f"sparsenet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train, prune, sparsify and benchmark a model (the main job)",
        description="Train a small MLP on scikit-learn's digits, prune it, convert it with sparsify and "
                    "compare accuracy and size; then time a large pruned MLP: dense torch vs sparsenet "
                    "vs torch.sparse CSR.",
    )
    demo.add_argument("--sparsity", type=_sparsity, default=0.9, help="fraction of weights to remove, in [0, 1) (default 0.9)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="seed for initialisation and shuffling (default 0)")
    demo.add_argument("--threads", type=_int_at_least(1), help="threads for torch and sparsenet (default: torch's)")
    demo.add_argument("--batch", type=_int_at_least(1), nargs="+", help="batch sizes to time (default 1 64)")
    demo.add_argument("--hidden", type=_int_at_least(1), help=f"width of the benchmark MLP (default {FULL['hidden']})")
    demo.add_argument("--layers", type=_int_at_least(1), help=f"Linear layers in the benchmark MLP (default {FULL['layers']})")
    demo.add_argument("--rounds", type=_int_at_least(1), help=f"timed rounds per batch size (default {FULL['rounds']})")
    demo.add_argument("--quick", action="store_true", help=f"tiny sizes for tests and CI (hidden {QUICK['hidden']}, "
                                                           f"{QUICK['layers']} layers, {QUICK['rounds']} rounds)")
    demo.add_argument("--no-bench", action="store_true", help="skip the timing part")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="print versions, ISA in use, threads and build facts",
                          description="Print sparsenet.show_config().")
    info.set_defaults(func=_cmd_info)
    return parser


def _console():
    from rich.console import Console

    # Wide enough for the tables when stdout is a file or a pipe (rich assumes 80 columns there).
    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def _cmd_info(args: argparse.Namespace) -> int:
    import sparsenet

    sparsenet.show_config()
    return 0


def _print_digits(console, r: dict) -> None:
    from rich.table import Table

    console.print(f"\n[bold]1. Digits MLP {'-'.join(map(str, r['sizes']))}[/bold]: trained {r['epochs']} epochs "
                  f"in {r['train_seconds']:.1f} s; dense test accuracy {r['dense_acc']:.1%}")
    console.print(f"\n[bold]2. Prune to {r['sparsity']:.0%}[/bold] (magnitude, global, {', '.join(r['excluded'])} kept dense)")
    console.print(f"   test accuracy {r['pruned_acc']:.1%} right after pruning, {r['finetuned_acc']:.1%} after a "
                  f"{r['finetune_epochs']}-epoch masked fine-tune ({r['finetune_seconds']:.1f} s)")
    print(str(r["sparsify_report"]).rstrip("\n"))  # pre-rendered by the report itself
    table = Table(title="dense vs pruned + sparsified")
    for col in ("", "dense", "sparse", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("test accuracy", f"{r['dense_acc']:.1%}", f"{r['sparse_acc']:.1%}",
                  f"{(r['sparse_acc'] - r['dense_acc']) * 100:+.1f} pts")
    table.add_row("parameters (non-zeros)", f"{r['dense_params']:,}", f"{r['sparse_nonzeros']:,}",
                  f"{r['sparse_nonzeros'] / r['dense_params']:.1%}")
    table.add_row("bytes (state_dict / saved file)", f"{r['dense_bytes']:,}", f"{r['file_bytes']:,}",
                  f"{r['bytes_ratio']:.1%} ({1 / r['bytes_ratio']:.1f}x smaller)")
    table.caption = (f"saved with sparsenet.save and reloaded: accuracy {r['reloaded_acc']:.1%}; "
                     f"logits vs the dense pruned model: max rel error {r['logits_max_rel_err']:.1e}")
    console.print(table)


def _print_bench(console, b: dict) -> None:
    from rich.table import Table

    mb = {k: v / 2**20 for k, v in b["weight_bytes"].items()}
    console.print(f"\n[bold]3. Timing a {b['layers']}-layer {b['hidden']}x{b['hidden']} MLP[/bold] (random init) "
                  f"pruned to {b['achieved_sparsity']:.1%}")
    console.print(f"   weights: {mb['dense']:.1f} MB dense, {mb['sparsenet']:.1f} MB sparsenet, "
                  f"{mb['torch.sparse']:.1f} MB torch.sparse CSR")
    table = Table(title=f"median time per batch over {b['rounds']} interleaved rounds (torch.inference_mode)")
    for col in ("batch", "implementation", "median ms", "speedup vs dense", "max rel error"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    for row in b["rows"]:
        style = "bold green" if row["impl"] == "sparsenet" else None
        err = "reference" if row["impl"] == "dense" else f"{row['max_rel_err']:.1e}"
        table.add_row(str(row["batch"]), row["impl"], f"{row['median_s'] * 1e3:.3f}", f"{row['speedup']:.2f}x",
                      err, style=style)
    table.caption = (f"memory-bound limit at small batch (dense bytes / sparsenet bytes): {b['bandwidth_limit']:.1f}x"
                     + ("" if b["hidden"] >= 2048 else "; these weights fit in cache, so timings measure the cache"))
    console.print(table)


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import sparsenet
    from sparsenet import demo

    sizes = QUICK if args.quick else FULL
    pick = lambda name: sizes[name] if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        sparsenet.set_num_threads(args.threads)
    progress = False if args.no_progress else None
    console = _console()
    console.print(f"[bold]sparsenet demo[/bold]: sparsity {args.sparsity:g}, seed {args.seed}, "
                  f"threads {torch.get_num_threads()} (sparsenet {sparsenet.get_num_threads()}), "
                  f"ISA {sparsenet.get_isa()}")

    r = demo.run_digits(args.sparsity, args.seed, sizes["epochs"], sizes["finetune_epochs"], progress=progress)
    _print_digits(console, r)
    if args.no_bench:
        return 0
    b = demo.run_bench(args.sparsity, pick("hidden"), pick("layers"), pick("batch"), pick("rounds"), args.seed,
                       progress=progress)
    _print_bench(console, b)
    if b["max_rel_err"] > AGREE_TOL:
        console.print(f"[bold red]outputs disagree[/bold red]: max rel error {b['max_rel_err']:.1e} > {AGREE_TOL:g}")
        return 1
    console.print(f"outputs agree: max rel error {b['max_rel_err']:.1e} (tolerance {AGREE_TOL:g})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns the exit status (2 for bad options)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad options (2, message on stderr)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
