"""sparsify / densify: swap pruned ``nn.Linear`` / ``nn.Conv2d`` layers for ``SparseLinear`` /
``SparseConv2d`` and back."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from sparsenet._names import check_exclude, check_patterns_match, is_excluded
from sparsenet._weights import as_matrix, is_linear, linear_features
from sparsenet.nn import autoformat
from sparsenet.nn.hf import guard_save_pretrained
from sparsenet.formats import registry
from sparsenet.nn.conv import SparseConv2d, conv_padding
from sparsenet.nn.linear import SparseLinear


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]
    sparsity: float
    format: str  # the sparse format when swapped ("csr", "bitmap"), "dense" when left alone
    bytes_before: int
    bytes_after: int
    note: str = ""
    gain: Optional[float] = None  # format="auto": measured dense time over the chosen format's

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SparsifyReport:
    """What ``sparsify`` did, per layer. ``print(report)`` shows a table; ``report.rows`` the data."""

    rows: list[LayerRow] = field(default_factory=list)
    min_sparsity: float = 0.0

    @property
    def converted(self) -> list[LayerRow]:
        return [r for r in self.rows if r.format != "dense"]

    @property
    def skipped(self) -> list[LayerRow]:
        return [r for r in self.rows if r.format == "dense"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def to_dicts(self) -> list[dict]:
        return [r.as_dict() for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return "sparsify: the model has no Linear, Conv1D or Conv2d layers; nothing was converted."
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"sparsify (min_sparsity={self.min_sparsity:g})")
        measured = any(r.gain is not None for r in self.rows)
        cols = ("layer", "shape", "sparsity", "format", "bytes before", "bytes after", *(("gain",) if measured else ()),
                "note")
        for col in cols:
            table.add_column(col, justify="right" if col.startswith(("bytes", "sparsity", "gain")) else "left")
        for r in self.rows:
            gain = (f"{r.gain:.2f}x" if r.gain is not None else "",) if measured else ()
            table.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.sparsity:.1%}", r.format,
                          f"{r.bytes_before:,}", f"{r.bytes_after:,}", *gain, r.note)
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        table.caption = (f"{len(self.converted)} of {len(self.rows)} layers converted; "
                         f"{self.bytes_before:,} -> {self.bytes_after:,} bytes ({ratio:.1%})")
        console = Console(width=140, record=True, force_terminal=False)
        with console.capture() as cap:
            console.print(table)
        return cap.get()


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _skip_reasons(model: nn.Module) -> dict[str, str]:
    """Linear (and Conv1D) layers that must keep their type, with the reason."""
    from sparsenet._weights import tie_reasons
    from sparsenet._masks import WeightMask, has_foreign_parametrization

    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child_name, child in module.named_modules():
                if isinstance(child, nn.Linear):
                    full = f"{name}.{child_name}" if name else child_name
                    reasons[full] = "read directly by nn.MultiheadAttention"
        if has_foreign_parametrization(module):
            # Converting would bake weight_norm & co. into fixed values and drop them unasked.
            kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"]
                              if not isinstance(p, WeightMask))
            reasons[name] = f"weight parametrized by {kinds}, not sparsenet's mask: remove that to convert"
    # A weight shared by several modules (tied embeddings/heads) cannot become one module's CSR:
    # worded as prune and reconstruct word it.
    linears = {name: m for name, m in model.named_modules() if is_linear(m) and name not in reasons}
    reasons.update(tie_reasons(model, linears))
    return reasons


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that also works after a forward of a torch.nn.utils.prune'd model.

    torch's pruning hooks leave ``module.weight`` as a non-leaf tensor attribute, which deepcopy
    refuses; the copy gets a detached clone instead (the hook recomputes it on the next forward).
    """
    memo: dict = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def sparsify(model: nn.Module, min_sparsity: float = 0.5, inplace: bool = False, exclude=None,
             format: str = "auto", rows: int = 1, example_inputs=None):
    """Replace every ``nn.Linear`` (and Hugging Face ``Conv1D``, GPT-2's transposed Linear) with at
    least ``min_sparsity`` zeros by a ``SparseLinear``, and every such ``nn.Conv2d`` by a
    ``SparseConv2d`` (CSR, its one format; depthwise convolutions stay dense).

    ``format="auto"`` (the default) times, on this machine, dense against every registered format
    for each layer at its shape on ``rows`` rows per call (batch x tokens for a transformer; default
    1) and keeps the fastest: a layer stays dense when no format beats it
    (:mod:`sparsenet.nn.autoformat`; timings are cached on disk, so a model converts without timing
    the second time). The report shows each choice and its measured gain. A registered format name
    (``"csr"``, or ``"bitmap"`` for 30-80% density, where it reads fewer bytes) converts every
    eligible layer to it without timing.

    ``example_inputs`` (a tensor, or a tuple of the model's positional arguments) runs the model once
    to record what each layer sees: Linear layers are then timed at their own rows per call (instead
    of ``rows``) and convolutions at their input size. With ``format="auto"`` and no example, Conv2d
    layers stay dense (the report says so).

    Layers on a CUDA device convert too (every format has CUDA kernels; built from a CPU float32
    copy, then moved back to the layer's device and dtype, float16 and bfloat16 included);
    ``format="auto"`` times them on their GPU, in their dtype.

    Accepts layers pruned by ``sparsenet.prune`` (before or after ``finalize``) or by
    ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``). ``exclude``: module names or glob
    patterns to leave dense, with everything under them (as for ``prune``). The report lists every
    Linear, Conv1D and Conv2d layer, and why each one left dense was. All or nothing: if any layer
    cannot be converted, the model is left as it was. Returns ``(model, report)``: the same object
    when ``inplace=True``, a deep copy otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    exclude = check_exclude(exclude)
    check_patterns_match(model, exclude)
    if format != "auto":
        format = registry.get(format).FORMAT  # unknown formats: a ValueError naming the known ones
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int (rows per call of each layer), got {rows!r}")
    timings = autoformat.TimingCache() if format == "auto" else None
    seen = _input_shapes(model, example_inputs) if example_inputs is not None else {}
    if not inplace:
        model = _copy_model(model)  # (seen is keyed by name: it holds for the copy)
    report = SparsifyReport(min_sparsity=float(min_sparsity))
    skip = _skip_reasons(model)
    plan: list[tuple[str, nn.Module, str, Optional[SparseLinear]]] = []  # the layer, if timing built it
    for name, module in model.named_modules():
        if not (is_linear(module) or isinstance(module, nn.Conv2d)):
            continue
        weight, mask = _weight_and_mask(module)
        kept = weight != 0 if mask is None else (mask & (weight != 0))
        numel = weight.numel()
        if weight.is_meta:  # no data to count (and no kernel there: _device_misfit says so)
            sparsity = float("nan")
        else:
            sparsity = 1.0 - kept.sum().item() / numel if numel else 0.0
        before = _tensor_bytes(weight, module.bias)
        shape = linear_features(module) if is_linear(module) else tuple(as_matrix(module, weight).shape)
        row = LayerRow(name, shape, sparsity, "dense", before, before)
        report.rows.append(row)
        if is_excluded(name, exclude):
            row.note = "excluded"
        elif name in skip:
            row.note = skip[name]
        elif isinstance(module, nn.Conv2d) and (reason := _conv_misfit(module)):
            row.note = reason
        elif _overrides_forward(module):
            row.note = f"{type(module).__name__} overrides its forward"
        elif weight.device.type != "cpu" and (reason := _device_misfit(weight)):
            row.note = reason
        elif weight.device.type == "cpu" and weight.dtype != torch.float32:
            row.note = f"{str(weight.dtype).removeprefix('torch.')}: the CPU kernels run float32 only"
        elif sparsity < min_sparsity:
            row.note = "below min_sparsity"
        elif isinstance(module, nn.Conv2d):
            _plan_conv(name, module, row, plan, timings, seen.get(name), format)
        elif weight.device.type != "cpu" and format != "auto":  # with a kernel there (_device_misfit)
            plan.append((name, module, format, None))
            row.format = format
        elif timings is not None:
            layer_rows = math.prod(seen[name][:-1]) if name in seen else rows  # as the example ran it
            with _naming(name):
                measured = autoformat.measure(as_matrix(module, weight),
                                              None if mask is None else as_matrix(module, mask),
                                              None if module.bias is None else module.bias.detach(), max(1, layer_rows),
                                              timings)
            row.gain = measured.gain
            if measured.choice == "dense":
                fastest = min((f for f in measured.seconds if f != "dense"), key=measured.seconds.get)
                row.note = (f"dense measured fastest at rows={layer_rows} ({1e3 * measured.seconds['dense']:.3f} ms, "
                            f"{fastest} {1e3 * measured.seconds[fastest]:.3f} ms)")
            else:
                plan.append((name, module, measured.choice, measured.layers.get(measured.choice)))
                row.format = measured.choice
                row.note = f"measured at rows={layer_rows}" + (" (cached)" if measured.cached else "")
        else:
            plan.append((name, module, format, None))
            row.format = format
    # All or nothing: every SparseLinear is built before the first swap, so a layer that cannot be
    # converted leaves the model (inplace=True) exactly as it was.
    built = [(name, module, timed if timed is not None else _convert(name, module, fmt))
             for name, module, fmt, timed in plan]
    rows = {r.name: r for r in report.rows}
    for name, _, sparse in built:
        rows[name].bytes_after = _tensor_bytes(*sparse.buffers(), *sparse.parameters())
    if built and built[0][0] == "":  # the model is itself a single Linear
        return built[0][2], report
    names = all_module_names(model)
    for _, module, sparse in built:
        for alias in names[id(module)]:  # a Linear registered twice is swapped under both names
            _set_submodule(model, alias, sparse)
    # transformers' save_pretrained would write what from_pretrained silently re-initialises.
    return guard_save_pretrained(model), report


def _weight_and_mask(module: nn.Module):
    """The weight as the layer uses it and sparsenet's (or torch.nn.utils.prune's) mask, if any; a
    weight under another parametrization (weight_norm) is read as the layer computes it."""
    from sparsenet._masks import effective_weight_and_mask, has_foreign_parametrization

    if has_foreign_parametrization(module):
        with torch.no_grad():
            return module.weight.detach(), None
    return effective_weight_and_mask(module)


def _overrides_forward(module: nn.Module) -> bool:
    """A subclass with a forward of its own may compute more than x W^T + b: not ours to replace."""
    if isinstance(module, nn.Conv2d):
        base = nn.Conv2d
    else:
        base = nn.Linear if isinstance(module, nn.Linear) else next(
            c for c in type(module).__mro__ if c.__name__ == "Conv1D")
    return type(module).forward is not base.forward


def _device_misfit(weight: torch.Tensor) -> str:
    """Why a layer off the CPU stays dense ("" when a kernel of this build runs it there)."""
    from sparsenet.ops import cuda

    device = weight.device
    if device.type != "cuda":
        return f"on {device}: no kernel for it in this build"
    if not cuda.available():
        return f"on {device}: this build has no CUDA kernels"
    if weight.dtype not in cuda.DTYPES:
        return f"on {device}: {str(weight.dtype).removeprefix('torch.')} weights have no CUDA kernel"
    return ""


def _conv_misfit(conv: nn.Conv2d) -> str:
    """Why a Conv2d stays dense whatever its sparsity ("" when it can be converted)."""
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise: stays dense (a few weights per output, nothing to skip)"
    try:
        conv_padding(conv)
    except ValueError as e:
        return str(e)
    return ""


def _input_shapes(model: nn.Module, example_inputs) -> dict[str, tuple[int, ...]]:
    """The input shape every Linear, Conv1D and Conv2d of ``model`` sees in one forward of
    ``example_inputs`` (its first call's; an unbatched Conv2d input as a batch of one), recorded by
    forward pre-hooks that are removed afterwards."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) or is_linear(module):
            def record(module, inputs, name=name):
                if name not in shapes and inputs and isinstance(inputs[0], torch.Tensor):
                    shape = tuple(inputs[0].shape)
                    shapes[name] = (1, *shape) if isinstance(module, nn.Conv2d) and len(shape) == 3 else shape
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(*args)
    except Exception as e:  # the model's own error, whatever it is: named, the model left as it was
        raise ValueError(f"sparsify: example_inputs do not run through the model: {type(e).__name__}: {e}") from e
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _plan_conv(name: str, conv: nn.Conv2d, row, plan: list, timings, input_shape, format: str) -> None:
    """A convertible Conv2d: to CSR when a format is given; timed against dense at its input size
    with ``format="auto"``, where the example input reached it."""
    if timings is None:
        plan.append((name, conv, "csr", None))
        row.format = "csr"
        if format != "csr":
            row.note = "Conv2d: csr, its one sparse format"
        return
    if input_shape is None:
        row.note = "Conv2d: timed at its input size; pass example_inputs (format='auto')"
        return
    with _naming(name):
        measured = autoformat.measure_conv(conv, input_shape, timings)
    row.gain = measured.gain
    shape = "x".join(str(v) for v in input_shape)
    if measured.choice == "dense":
        row.note = (f"dense measured fastest on {shape} ({1e3 * measured.seconds['dense']:.3f} ms, "
                    f"csr {1e3 * measured.seconds['csr']:.3f} ms)")
    else:
        plan.append((name, conv, "csr", measured.layers.get("csr")))
        row.format = "csr"
        row.note = f"measured on {shape}" + (" (cached)" if measured.cached else "")


def _convert(name: str, module: nn.Module, format: str) -> nn.Module:
    with _naming(name):
        # Formats are built from float32 CPU weights; a layer elsewhere (CUDA, float16) is converted
        # from a CPU float32 copy and the sparse layer moved back to the layer's device and dtype.
        weight = module.weight
        on_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
        source = module if on_cpu else copy.deepcopy(module).to("cpu", torch.float32)
        if isinstance(source, nn.Conv2d):
            sparse = SparseConv2d.from_dense(source)
        else:
            sparse = SparseLinear.from_dense(source, format=format)
        return sparse if on_cpu else sparse.to(weight.device, weight.dtype)


@contextlib.contextmanager
def _naming(name: str):
    """A layer's conversion (or its timing) that fails names the layer (e.g. a NaN weight)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"sparsify: layer {name!r} cannot be converted: {e}") from e


def all_module_names(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is reachable by (named_modules lists one only)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def densify(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn every ``SparseLinear`` back into an ``nn.Linear``, and every ``SparseConv2d`` into an
    ``nn.Conv2d``, with the same weights."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _copy_model(model)
    if isinstance(model, (SparseLinear, SparseConv2d)):
        return _dense_twin(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (SparseLinear, SparseConv2d)):
            _set_submodule(model, name, _dense_twin(module))
    return model


def _dense_twin(module: nn.Module) -> nn.Module:
    return module.to_dense_linear() if isinstance(module, SparseLinear) else module.to_dense_conv()
