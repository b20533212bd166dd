"""The ``sparsenet`` command: ``sparsenet demo``, ``sparsenet prune``, ``sparsenet reconstruct``,
``sparsenet shrink`` and ``sparsenet info``.

Subcommands (``sparsenet COMMAND ...``) so more can join later. torch and sparsenet are imported only
inside the commands, so ``--help`` and option errors answer at once.

``sparsenet prune`` choices, and why:

* Models come from code (``pkg.module:factory``, optionally with ``--weights``), from TorchScript, or
  from a ``torch.save`` pickle only with ``--trust-pickle``: unpickling runs code from the file.
* TorchScript: parametrizations cannot be registered on ScriptModules, so masks are computed on eager
  stand-ins sharing the scripted weights and then written into them as zeros; the output is the
  scripted model's state_dict (load it into ``torch.jit.load(original)`` with ``sparsenet.load``).
  Scripted code does not run Python hooks, so only data-free criteria (magnitude, random) apply.
* ``--calib`` is a safetensors file, so calibration data never needs pickle either: ``inputs``
  [N, ...] with optional ``targets`` [N, ...], or any other set of [N, ...] tensors passed as keyword
  arguments; rows are cut into batches of ``--calib-batch``. The first batch also measures each
  layer's output positions, so the report's FLOPs are per sample; without it they are per position.
* ``sparsenet reconstruct`` shares prune's model, calibration, structure and output options and
  wraps :func:`sparsenet.reconstruct`; it needs ``--calib`` and refuses TorchScript (its solvers
  run forward hooks and keep masks as parametrizations, neither of which scripted code supports).
* Option errors exit with 2 (argparse); a failure while loading or pruning prints one
  ``error:`` line and exits with 1 -- also when the model's own code (its module, its factory, a
  trusted pickle) raises or calls exit(); the output file is written only after everything
  succeeded, and only to a regular file (or a new one): -o naming a directory or device is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
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

    _add_prune_parser(sub)
    _add_reconstruct_parser(sub)

    _add_shrink_parser(sub)

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
    table.caption = (f"dense bytes / sparsenet bytes: {b['byte_ratio']:.1f}x (the small-batch speedup at equal bandwidth)"
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
    progress = _progress(args)
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


def _progress(args: argparse.Namespace):
    """--no-progress hides the bars; otherwise they show only when stderr is a terminal (tqdm's
    rule), so a redirected stderr gets no bar drawings."""
    return False if args.no_progress else None


class CommandError(Exception):
    """A failure a user can fix (bad file, unknown factory): printed as one line, exit status 1."""


@contextlib.contextmanager
def _library_errors():
    """Around a call of prune / reconstruct / shrink: sparsenet's own refusals (bad settings, data
    that does not fit the model) and anything the model's forward raises, as one error line."""
    try:
        yield
    except (ValueError, TypeError, RuntimeError) as e:
        raise CommandError(str(e)) from e
    except (Exception, SystemExit) as e:  # the model's own code (exit() included)
        raise _user_code_failed("the model's forward", e) from e


def _user_code_failed(what: str, e: BaseException) -> CommandError:
    """The user's code (the model's module, its factory) raised or called exit(): one error line."""
    if isinstance(e, SystemExit):
        return CommandError(f"{what} called exit({'' if e.code is None else repr(e.code)})")
    return CommandError(f"{what} raised {type(e).__name__}: {e}")


# ---- sparsenet prune ---------------------------------------------------------------------------

# Literal rather than read from the registry, so --help does not import torch.
CRITERIA = ("magnitude", "random", "wanda", "taylor")
DATA_CRITERIA = ("wanda", "taylor")
_NM_SPEC = re.compile(r"^(\d+):(\d+)$")
_BLOCK_SPEC = re.compile(r"^(\d+)[xX](\d+)$")


def _structure(text: str) -> str:
    if text in ("unstructured", "channel", "block"):
        return text
    match = _NM_SPEC.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"must be unstructured, channel, block or N:M such as 2:4, got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise argparse.ArgumentTypeError(f"N:M needs 1 <= N < M, got {text!r}")
    return text


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, such as 1,3,224,224, got {text!r}")
    return dims


def _block(text: str) -> tuple[int, int]:
    match = _BLOCK_SPEC.match(text)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"must be RxC with positive integers, such as 16x16, got {text!r}")
    return int(match.group(1)), int(match.group(2))


_MODEL_EPILOG = (
    "MODEL is pkg.module:factory or path/to/file.py:factory (a zero-argument callable returning an "
    "nn.Module; the current directory is importable), or hf:DIR (a Hugging Face model directory: its "
    "config.json, and its weights if it has them; the class is the config's first architecture), or "
    "hf:CLASS (a transformers class name such as BertModel, built from its default config with random "
    "weights, for --weights), or a TorchScript file, or, with --trust-pickle, a torch.save pickle of a "
    "whole module."
)
_HF_PREFIX = "hf:"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_CALIB_EPILOG = (
    "CALIB is a safetensors file: either 'inputs' [N, ...] with optional 'targets' [N, ...] (batches are "
    "model(inputs)), or any other set of [N, ...] tensors passed as keyword arguments "
    "(model(input_ids=..., attention_mask=...); a 'labels' entry is the target). Rows are cut into "
    "batches of --calib-batch."
)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _add_model_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--model / --weights / --trust-pickle, read by :func:`_load_model`."""
    parser.add_argument("--model", required=True, metavar="MODEL", help=f"what to {what} (see below)")
    parser.add_argument("--weights", metavar="FILE", help="safetensors weights for a factory model: a "
                        "sparsenet.save file or a plain state_dict")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow MODEL to be a torch.save pickle (unpickling runs code from the file)")


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    """--sparsity / --structure / --block, checked together by :func:`_check_target_args`."""
    parser.add_argument("--sparsity", type=_sparsity, help="fraction of weights to remove, in [0, 1); "
                        "required except for N:M, which fixes its own")
    parser.add_argument("--structure", type=_structure, default="unstructured", metavar="STRUCTURE",
                        help="unstructured (default), channel, block or N:M such as 2:4")
    parser.add_argument("--block", type=_block, metavar="RxC", help="block shape for --structure block "
                        "(default 16x16)")


def _add_exclude_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help="module names or globs to leave dense (and everything under them)")


def _add_calib_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """--calib / --calib-batch, read by :func:`_load_calib`."""
    parser.add_argument("--calib", required=required, metavar="CALIB",
                        help="calibration data (safetensors, see below)")
    parser.add_argument("--calib-batch", type=_int_at_least(1), default=8, metavar="ROWS",
                        help="calibration rows per batch (default 8)")


def _add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    """-o / --sparsify / --min-sparsity / --format / --no-progress, as :func:`_save_output` uses them."""
    from sparsenet.formats import registry

    parser.add_argument("-o", "--output", required=True, metavar="OUT", help=f"where to save the {what} model")
    parser.add_argument("--sparsify", action="store_true",
                        help=f"convert {what} nn.Linear layers to SparseLinear before saving")
    parser.add_argument("--min-sparsity", type=_sparsity, help="with --sparsify: convert only "
                        "layers at least this sparse (default 0.5; below it CSR is no smaller than dense)")
    parser.add_argument("--format", choices=["auto", *registry.names()], help="with --sparsify: the sparse "
                        "format (default auto: dense and every format timed per layer on this machine, the "
                        "fastest kept; bitmap reads fewer bytes at 30-80%% density)")
    parser.add_argument("--rows", type=_int_at_least(1), help="with --format auto: rows per call each layer "
                        "is timed at (batch x tokens; default 1)")
    parser.add_argument("--input-shape", type=_shape, metavar="N,C,H,W", help="with --format auto: the shape of "
                        "one float input of the model (such as 1,3,224,224); a random one is run once so that "
                        "each Conv2d is timed at its input size and each Linear at its rows (without it, "
                        "convolutions stay dense under auto)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_prune_parser(sub) -> None:
    prune = sub.add_parser(
        "prune", help="prune a model and save it with sparsenet.save",
        description="Prune every nn.Linear / nn.Conv2d of a model, print a per-layer report (sparsity, "
                    "parameters, FLOPs) and save the finalized model with sparsenet.save.",
        epilog=f"{_MODEL_EPILOG} {_CALIB_EPILOG}",
    )
    _add_model_options(prune, "prune")
    _add_target_options(prune)
    prune.add_argument("--criterion", choices=CRITERIA, default="magnitude", help="importance score "
                       "(default magnitude; wanda and taylor need --calib)")
    prune.add_argument("--scope", choices=("layer", "global"), default="layer",
                       help="same sparsity in every layer, or one ranking across layers (default layer)")
    _add_exclude_option(prune)
    _add_calib_options(prune, required=False)
    prune.add_argument("--seed", type=_int_at_least(0), help="seed for --criterion random")
    _add_output_options(prune, "pruned")
    prune.set_defaults(func=_cmd_prune, check=_check_prune_args, subparser=prune)


def _check_target_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks shared by prune and reconstruct: sparsity vs structure, --block, --min-sparsity."""
    nm = _NM_SPEC.match(args.structure) is not None
    if args.sparsity is None and not nm:
        parser.error(f"--sparsity is required for --structure {args.structure}")
    if nm and args.sparsity is not None:
        n, m = map(int, args.structure.split(":"))
        if abs(args.sparsity - (m - n) / m) > 1e-9:
            parser.error(f"--structure {args.structure} fixes the sparsity at {(m - n) / m:g}; "
                         f"--sparsity {args.sparsity:g} conflicts with it (leave it out)")
    if args.block is not None and args.structure != "block":
        parser.error("--block applies only to --structure block")
    if args.min_sparsity is not None and not args.sparsify:
        parser.error("--min-sparsity applies only with --sparsify")
    if args.format is not None and not args.sparsify:
        parser.error("--format applies only with --sparsify")
    if args.rows is not None and (not args.sparsify or args.format not in (None, "auto")):
        parser.error("--rows applies only with --sparsify and --format auto")
    if args.input_shape is not None and (not args.sparsify or args.format not in (None, "auto")):
        parser.error("--input-shape applies only with --sparsify and --format auto")


def _check_prune_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_target_args(parser, args)
    if args.criterion in DATA_CRITERIA and args.calib is None:
        parser.error(f"--criterion {args.criterion} needs calibration data: pass --calib CALIB")


def _import_factory(spec: str):
    """``pkg.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    import importlib
    import importlib.util

    module_name, _, attr = spec.rpartition(":")
    is_file = module_name.endswith(".py")
    # Dotted names only: import_module reads "../x" or ".x" as a relative import and fails oddly.
    if not module_name or not attr.isidentifier() or not (
            is_file or all(part.isidentifier() for part in module_name.split("."))):
        raise CommandError(f"--model {spec!r} is neither a file nor pkg.module:factory")
    if is_file and not os.path.isfile(module_name):
        raise CommandError(f"--model {spec!r}: no such file {module_name!r}")
    try:
        if is_file:
            mod_spec = importlib.util.spec_from_file_location(
                f"_sparsenet_model_{abs(hash(os.path.abspath(module_name)))}", module_name)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            # A console script's sys.path starts at the script's folder; users expect their own
            # working directory to be importable, as with `python -m`.
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise CommandError(f"--model {spec!r}: cannot import {module_name!r} ({e})") from e
    except (Exception, SystemExit) as e:  # the module's own code failed (SyntaxError, exit(), ...)
        raise _user_code_failed(f"--model {spec!r}: importing {module_name!r}", e) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CommandError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def _is_torchscript(path: str) -> bool:
    """TorchScript archives hold compiled code (``code/``, ``constants.pkl``); torch.save zips do not."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile as e:
        raise CommandError(f"{path!r} is a damaged zip archive ({e})") from e


def _load_hf(spec: str):
    """A transformers model from a local directory (config.json, weights if present) or a class name.

    Nothing is downloaded: a directory is read with local_files_only, a class gets its default config.
    """
    try:
        import transformers
    except ImportError as e:
        raise CommandError(f"--model {_HF_PREFIX}{spec}: needs the transformers package ({e})") from e
    try:
        if os.path.isdir(spec):
            if not os.path.isfile(os.path.join(spec, "config.json")):
                raise CommandError(f"--model {_HF_PREFIX}{spec}: the directory has no config.json")
            config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
            names = getattr(config, "architectures", None) or ["AutoModel"]
            cls = getattr(transformers, names[0], None)
            if cls is None:
                raise CommandError(f"--model {_HF_PREFIX}{spec}: transformers has no class {names[0]!r}")
            if any(os.path.isfile(os.path.join(spec, f)) for f in _HF_WEIGHTS):
                return cls.from_pretrained(spec, local_files_only=True)
            return cls.from_config(config) if names[0] == "AutoModel" else cls(config)
        cls = getattr(transformers, spec, None)
        if not (isinstance(cls, type) and hasattr(cls, "config_class") and cls.config_class is not None):
            raise CommandError(f"--model {_HF_PREFIX}{spec}: neither a directory nor a transformers model "
                               "class name (such as BertModel)")
        return cls(cls.config_class())
    except CommandError:
        raise
    except (Exception, SystemExit) as e:  # a broken config or weights file, a class needing more
        raise _user_code_failed(f"--model {_HF_PREFIX}{spec}: building it", e) from e


def _load_model(args: argparse.Namespace):
    """(model, is_torchscript) from --model / --weights / --trust-pickle."""
    import torch
    from torch import nn

    if args.model.startswith(_HF_PREFIX):
        model = _load_hf(args.model[len(_HF_PREFIX):])
        if args.weights is not None:
            _load_weights(model, args.weights)
        return model, False
    if os.path.isfile(args.model):
        if args.weights is not None:
            raise CommandError("--weights applies only to a factory model; a model file carries its weights")
        with open(args.model, "rb") as f:
            head = f.read(9)
        if _is_torchscript(args.model):
            try:
                return torch.jit.load(args.model, map_location="cpu"), True
            except Exception as e:  # a zip that only looks like TorchScript
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CommandError(f"cannot load {args.model!r} as TorchScript ({first_line})") from e
        if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
            raise CommandError(f"{args.model!r} holds weights only: pass --model pkg.module:factory "
                               f"--weights {args.model}")
        if not args.trust_pickle:
            raise CommandError(f"{args.model!r} is not TorchScript; loading it as a torch.save pickle would run "
                               "code stored in the file. Pass --trust-pickle only if you trust its source")
        try:
            model = torch.load(args.model, map_location="cpu", weights_only=False)
        except (Exception, SystemExit) as e:  # unpickling runs the file's code, exit() included
            raise _user_code_failed(f"loading {args.model!r} as a torch.save pickle", e) from e
        if not isinstance(model, nn.Module):
            raise CommandError(f"{args.model!r} holds a {type(model).__name__}, not an nn.Module")
        return model, False

    factory = _import_factory(args.model)
    try:
        model = factory()
    except (Exception, SystemExit) as e:  # it raised, needs arguments, or called exit()
        raise _user_code_failed(f"--model {args.model!r}: the factory", e) from e
    if not isinstance(model, nn.Module):
        raise CommandError(f"--model {args.model!r} returned a {type(model).__name__}, not an nn.Module")
    if args.weights is not None:
        _load_weights(model, args.weights)
    return model, False


def _load_weights(model, path: str) -> None:
    """A sparsenet.save file (sparse layers loaded as the model's own dense layers, so a sparsified
    file re-prunes like any other) or a plain safetensors state_dict."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sparsenet.io import load_dense

    if not os.path.isfile(path):
        raise CommandError(f"--weights {path!r}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            is_sparsenet = "sparsenet" in (f.metadata() or {})
    except Exception as e:
        raise CommandError(f"--weights {path!r} is not a readable safetensors file ({e})") from e
    try:
        if is_sparsenet:
            load_dense(path, model)
        else:
            model.load_state_dict(load_file(path), strict=True)
    except (ValueError, RuntimeError, AttributeError) as e:
        raise CommandError(f"--weights {path!r} does not fit the model: {e}") from e


def _load_calib(path: str, rows: int) -> list:
    """Batches in sparsenet's calibration protocol from a safetensors file (layout: see the epilog)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CommandError(f"--calib {path!r}: no such file")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise CommandError(f"--calib {path!r} is not a readable safetensors file ({e})") from e
    if not tensors:
        raise CommandError(f"--calib {path!r} holds no tensors")
    lengths = {name: t.shape[0] if t.dim() else None for name, t in tensors.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise CommandError(f"--calib {path!r}: every tensor needs the same number of rows, got {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise CommandError(f"--calib {path!r} holds no rows")
    if "inputs" in tensors:
        extra = set(tensors) - {"inputs", "targets"}
        if extra:
            raise CommandError(f"--calib {path!r}: next to 'inputs' only 'targets' is allowed, got {sorted(extra)}")
        inputs, targets = tensors["inputs"], tensors.get("targets")
        return [inputs[i:i + rows] if targets is None else (inputs[i:i + rows], targets[i:i + rows])
                for i in range(0, n, rows)]
    return [{k: t[i:i + rows] for k, t in tensors.items()} for i in range(0, n, rows)]


def _script_layers(script):
    """Eager nn.Linear / nn.Conv2d stand-ins sharing a TorchScript module's weights, for scoring.

    Parametrizations cannot be registered on ScriptModules, so the masks are computed on these
    stand-ins (nested like the original, so names and --exclude match) and then written into the
    scripted weights as zeros.
    """
    from torch import nn

    root, originals = nn.Module(), {}
    for name, sub in script.named_modules():
        kind = getattr(sub, "original_name", None)
        if kind not in ("Linear", "Conv2d") or not name:
            continue
        weight, bias = sub.weight, getattr(sub, "bias", None)
        if kind == "Linear":
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        else:
            groups = int(getattr(sub, "groups", 1))
            layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                              groups=groups, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
        originals[name] = sub
    if not originals:
        raise CommandError("the TorchScript model has no Linear / Conv2d submodules to prune")
    return root, originals


def _cmd_prune(args: argparse.Namespace) -> int:
    import torch

    import sparsenet
    from sparsenet.pruning.flops import output_positions

    _check_output(args.output)
    model, scripted = _load_model(args)
    if scripted and args.criterion in DATA_CRITERIA:
        raise CommandError(f"--criterion {args.criterion} runs the model with hooks, which TorchScript code does "
                           "not call; use magnitude or random, or pass the eager model as pkg.module:factory")
    if scripted and args.sparsify:
        raise CommandError("--sparsify cannot put SparseLinear layers into a TorchScript model; "
                           "prune the eager model (pkg.module:factory) to sparsify it")
    calib = _load_calib(args.calib, args.calib_batch) if args.calib is not None else None
    target, originals = _script_layers(model) if scripted else (model, None)
    with _library_errors():
        pruner = sparsenet.prune(
            target, args.sparsity, criterion=args.criterion, scope=args.scope, exclude=args.exclude,
            seed=args.seed, structure=args.structure, block=args.block, calib=calib,
            progress=_progress(args),
        )
        report = pruner.report()
        if calib is not None:  # FLOPs per sample need the layers' real output sizes
            report = report.with_positions(output_positions(model, pruner.layers, calib[0]))
    if scripted:
        with torch.no_grad():
            for name, mask in pruner.masks.items():
                originals[name].weight.masked_fill_(~mask, 0)
    else:
        pruner.finalize()

    console = _console()
    console.print(report)
    _save_output(console, model, args)
    return 0


def _check_output(output: str) -> None:
    """Fail before the slow part, not after it: -o must name a file that save can write."""
    from sparsenet.io import output_target

    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        problem = "is not a folder" if os.path.exists(out_dir) else "does not exist"
        raise CommandError(f"-o {output!r}: folder {out_dir!r} {problem}")
    try:
        target = output_target(output)  # refuses directories, FIFOs, devices
    except (ValueError, OSError) as e:
        raise CommandError(f"-o {output!r}: {e}") from e
    # save writes a temporary file beside the target, so that folder must be writable.
    if not os.access(os.path.dirname(target), os.W_OK | os.X_OK):
        raise CommandError(f"-o {output!r}: folder {os.path.dirname(target)!r} is not writable")


def _save_output(console, model, args: argparse.Namespace) -> None:
    """--sparsify (printing its report), then sparsenet.save to -o, printing the saved size."""
    import torch

    import sparsenet

    try:
        if getattr(args, "sparsify", False):  # (shrink has no --sparsify)
            example = None if args.input_shape is None else torch.randn(*args.input_shape)
            model, sparsify_report = sparsenet.sparsify(
                model, min_sparsity=0.5 if args.min_sparsity is None else args.min_sparsity, inplace=True,
                format=args.format or "auto", rows=args.rows or 1, example_inputs=example)
            print(str(sparsify_report).rstrip("\n"))
        size = sparsenet.save(model, args.output)
    except (ValueError, OSError) as e:  # a layer that cannot be stored (NaN), a full or read-only disk
        raise CommandError(f"cannot save {args.output!r}: {e}") from e
    console.print(f"saved {args.output}: {size}")


# ---- sparsenet reconstruct ---------------------------------------------------------------------

# Literal rather than read from sparsenet.reconstruction, so --help does not import torch.
METHODS = ("sparsegpt", "admm", "lsq")
ALLOCATIONS = ("uniform", "owl", "search")
REC_EPOCHS, REC_LR = 10, 3e-4  # sparsenet.reconstruct's defaults, for --help only


def _add_reconstruct_parser(sub) -> None:
    rec = sub.add_parser(
        "reconstruct", help="prune a model one-shot and rebuild its weights from calibration data",
        description="Prune every nn.Linear / nn.Conv2d of a model with a layer-wise solver (SparseGPT, "
                    "ADMM or least squares) that rebuilds the kept weights from calibration data, "
                    "optionally fit each block to the dense model's outputs, print a per-layer table "
                    "and save the finalized model with sparsenet.save.",
        epilog=f"{_MODEL_EPILOG} TorchScript models are refused: reconstruction runs the model with "
               f"forward hooks and parametrizations. {_CALIB_EPILOG} The last fifth of the batches (none when "
               "there is only one) is held out for early stopping of the block fits.",
    )
    _add_model_options(rec, "reconstruct")
    _add_target_options(rec)
    rec.add_argument("--method", choices=METHODS, default="admm", help="layer solver: sparsegpt (OBS), "
                     "admm (gradual-mask ADMM, exact refit) or lsq (Wanda mask, exact refit); default admm")
    rec.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                     help="per-layer sparsities: uniform (default), owl (outlier-weighted) or search "
                          "(sensitivity search); same total either way")
    rec.add_argument("--no-blockwise", action="store_true",
                     help="skip fitting each block's kept weights to the dense block's outputs")
    rec.add_argument("--no-correct", action="store_true", help="solve each layer on the pruned model's "
                     "inputs only, not against the dense model's (no correction of earlier errors)")
    rec.add_argument("--final", choices=("kl", "cosine", "mse"), help="after the blocks, fit the kept "
                     "weights end to end to the dense model's output: kl (logits), cosine (embeddings) "
                     "or mse; default off")
    rec.add_argument("--epochs", type=_int_at_least(0),
                     help=f"most epochs of each block fit (default {REC_EPOCHS}; early stopping may end sooner)")
    rec.add_argument("--lr", type=_positive_float, help="Adam learning rate of the block "
                     f"fits (default {REC_LR:g})")
    _add_exclude_option(rec)
    rec.add_argument("--blocks", nargs="+", action="extend", metavar="NAME",
                     help="module names to treat as blocks (default: detected transformer layers / "
                          "residual blocks; other layers are their own stage)")
    _add_calib_options(rec, required=True)
    _add_output_options(rec, "reconstructed")
    rec.set_defaults(func=_cmd_reconstruct, check=_check_reconstruct_args, subparser=rec)


def _check_reconstruct_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_target_args(parser, args)
    if args.allocation != "uniform" and _NM_SPEC.match(args.structure) is not None:
        parser.error(f"--allocation {args.allocation} cannot vary the fixed sparsity of "
                     f"--structure {args.structure}")
    if args.structure == "channel" and args.method == "sparsegpt":
        parser.error("--structure channel needs --method lsq or admm: sparsegpt prunes within rows")
    if args.no_blockwise and args.final is None and (args.epochs is not None or args.lr is not None):
        parser.error("--epochs and --lr set the block (and --final) fits, which --no-blockwise turns off")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import sparsenet

    _check_output(args.output)
    model, scripted = _load_model(args)
    if scripted:
        raise CommandError("reconstruct cannot work on a TorchScript model: it needs forward hooks and "
                           "parametrizations, which scripted code does not run; pass the eager model as "
                           "pkg.module:factory (with --weights)")
    calib = _load_calib(args.calib, args.calib_batch)
    with _library_errors():
        result = sparsenet.reconstruct(
            model, calib, args.sparsity, structure=args.structure, block=args.block, method=args.method,
            blockwise=not args.no_blockwise, correct=not args.no_correct, allocation=args.allocation,
            exclude=args.exclude, blocks=args.blocks, final=args.final, progress=_progress(args),
            # Only what was given: otherwise the library's own defaults apply.
            **{k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None},
        )
    console = _console()
    console.print(result)
    model = result.finalize()
    _save_output(console, model, args)
    return 0


# ---- sparsenet shrink ----------------------------------------------------------------------------

def _add_shrink_parser(sub) -> None:
    shrink = sub.add_parser(
        "shrink", help="remove whole channels and rebuild a smaller dense model",
        description="Remove whole neurons and filters (channel groups found by tracing the model on "
                    "the first calibration batch), refit the layers that read them on the calibration "
                    "data, print a per-group table and save the smaller model with sparsenet.save "
                    "(sparsenet.load rebuilds it into the plain model).",
        epilog=f"{_MODEL_EPILOG} {_CALIB_EPILOG}",
    )
    _add_model_options(shrink, "shrink")
    shrink.add_argument("--ratio", type=_sparsity, required=True,
                        help="fraction of the target to remove, in [0, 1) (0.5 with --target latency: 2x faster)")
    shrink.add_argument("--target", choices=("params", "flops", "latency"), default="params",
                        help="what --ratio counts: shrinkable parameters (default), multiply-adds, or the "
                             "forward time measured on the first calibration batch")
    shrink.add_argument("--scope", choices=("global", "layer"), default="global",
                        help="one ranking across all channel groups, or the same fraction of each (default global)")
    shrink.add_argument("--round-to", type=_int_at_least(1), default=1, metavar="N",
                        help="keep every width a multiple of N (default 1)")
    shrink.add_argument("--min-ratio", type=_sparsity, metavar="R",
                        help="global scope: every channel group loses at least this fraction of its channels")
    shrink.add_argument("--max-ratio", type=_sparsity, metavar="R",
                        help="global scope: no channel group loses more than this fraction of its channels")
    _add_exclude_option(shrink)
    _add_calib_options(shrink, required=True)
    shrink.add_argument("--no-reconstruct", action="store_true",
                        help="remove only: do not refit the layers that read removed channels")
    shrink.add_argument("-o", "--output", required=True, metavar="OUT", help="where to save the shrunk model")
    shrink.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    shrink.set_defaults(func=_cmd_shrink)


def _example_inputs(batch):
    """The first calibration batch as shrink's example inputs: a tensor, (inputs, targets) or kwargs."""
    return batch[0] if isinstance(batch, tuple) else batch


def _cmd_shrink(args: argparse.Namespace) -> int:
    import sparsenet

    _check_output(args.output)
    model, scripted = _load_model(args)
    if scripted:
        raise CommandError("shrink needs the eager model (pkg.module:factory, hf:...): it traces the forward "
                           "and rebuilds modules, which a TorchScript model does not allow")
    calib = _load_calib(args.calib, args.calib_batch)
    with _library_errors():
        report = sparsenet.shrink(
            model, _example_inputs(calib[0]), args.ratio, target=args.target, calib=calib,
            reconstruct=not args.no_reconstruct,
            scope=args.scope, round_to=args.round_to, exclude=args.exclude, progress=_progress(args),
            min_ratio=args.min_ratio, max_ratio=args.max_ratio,
        )
    console = _console()
    print(str(report).rstrip("\n"))
    _save_output(console, model, args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns the exit status (2 for bad options)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "check", None) is not None:  # checks that span several options
            args.check(args.subparser, args)
    except SystemExit as e:  # argparse exits on --help (0) and on bad options (2, message on stderr)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except CommandError as e:
        # One line, whatever the message quoted (exceptions from torch or user code span several).
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"sparsenet {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
