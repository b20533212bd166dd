"""Per-layer pruning report: sparsity, parameters and FLOPs before/after, as dicts and as a table.

FLOPs count the weight's multiply-adds times 2 (bias adds and activations are left out: they do
not change with pruning). Per output position a layer does one multiply-add per weight (see
:mod:`sparsenet.pruning.flops`), so:

* with measured positions (``PruningReport.with_positions`` / ``Pruner.report`` given an example
  batch) the FLOPs are **per input sample** (``flops_per == "sample"``): a Conv2d's output size and
  a sequence's length are then included;
* without, they are **per output position** (``flops_per == "position"``): per token or row for
  Linear (and Hugging Face's Conv1D, a Linear stored transposed), per output pixel for Conv2d.
  Totals are given only when every row has the same unit.

Layers the run left dense for a reason of its own (a weight tied to an embedding, a structure
that does not fit) are in ``skipped`` (name -> reason) and print as one line each under the
table, as :func:`skipped_lines` words them.
"""

from __future__ import annotations

import io
from typing import Mapping, Optional

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn


def _si(value: Optional[float]) -> str:
    """1234567 -> '1.23M': FLOP counts span too many digits for a readable table otherwise."""
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def skipped_lines(skipped: Mapping[str, str]) -> list[str]:
    """One line per layer left dense: ``"lm_head: weight tied to transformer.wte (an embedding);
    left dense"``."""
    return [f"{name}: {reason}; left dense" for name, reason in skipped.items()]


def with_skipped(renderable: RenderableType, skipped: Mapping[str, str]) -> RenderableType:
    """``renderable`` followed by the skipped layers' lines (as plain text: names may hold '[')."""
    if not skipped:
        return renderable
    return Group(renderable, *(Text(line) for line in skipped_lines(skipped)))


class PruningReport(list):
    """One dict per layer, in model order.

    Keys: ``name, type, shape, numel, pruned, sparsity`` (from the masks), ``params_before,
    params_after`` (weight + bias; the bias is never pruned), ``positions`` (output positions per
    sample, or None when not measured), ``flops_before, flops_after`` and ``flops_per``
    (``"sample"`` or ``"position"``, see the module docstring).

    It is a plain list for code (``report[0]["sparsity"]``, ``json.dumps(report.to_dicts())``) and
    renders as a table for people (``print(report)`` or ``rich.print(report)``). ``skipped`` maps
    each layer left dense to the reason (not rows: nothing of theirs was counted).
    """

    def __init__(self, rows=(), skipped: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(rows)
        self.skipped: dict[str, str] = dict(skipped or {})

    @classmethod
    def from_masks(
        cls,
        masks: Mapping[str, Tensor],
        modules: Mapping[str, nn.Module],
        positions: Optional[Mapping[str, float]] = None,
        skipped: Optional[Mapping[str, str]] = None,
    ) -> "PruningReport":
        rows = []
        for name, mask in masks.items():
            numel = mask.numel()
            pruned = numel - int(mask.sum())
            bias = getattr(modules[name], "bias", None)
            n_bias = bias.numel() if isinstance(bias, Tensor) else 0
            rows.append(
                {
                    "name": name,
                    "type": type(modules[name]).__name__.removeprefix("Parametrized"),
                    "shape": tuple(mask.shape),
                    "numel": numel,
                    "pruned": pruned,
                    "sparsity": pruned / numel if numel else 0.0,
                    "params_before": numel + n_bias,
                    "params_after": numel - pruned + n_bias,
                }
            )
        return cls(rows, skipped).with_positions(positions)

    def with_positions(self, positions: Optional[Mapping[str, float]]) -> "PruningReport":
        """A copy whose FLOPs are per sample for the layers in ``positions`` (name -> output
        positions per sample, e.g. from :func:`sparsenet.pruning.flops.output_positions`)."""
        rows = []
        for r in self:
            r = dict(r)
            p = None if positions is None else positions.get(r["name"])
            r["positions"] = p
            r["flops_per"] = "position" if p is None else "sample"
            scale = 2 * (1 if p is None else p)  # one multiply-add = 2 FLOPs
            r["flops_before"] = scale * r["numel"]
            r["flops_after"] = scale * (r["numel"] - r["pruned"])
            rows.append(r)
        return PruningReport(rows, self.skipped)

    @property
    def rows(self) -> list[dict]:
        return list(self)

    def to_dicts(self) -> list[dict]:
        """Independent copies of the rows (safe to modify or ``json.dumps``)."""
        return [dict(r) for r in self]

    @property
    def total_sparsity(self) -> float:
        numel = sum(r["numel"] for r in self)
        return sum(r["pruned"] for r in self) / numel if numel else 0.0

    @property
    def total(self) -> dict:
        """Sums over the layers; FLOPs are None when the rows mix per-sample and per-position."""
        units = {r.get("flops_per") for r in self}
        same = len(units) == 1 and None not in units
        total = {
            key: sum(r[key] for r in self)
            for key in ("numel", "pruned", "params_before", "params_after")
        }
        total["sparsity"] = self.total_sparsity
        total["flops_per"] = units.pop() if same else None
        for key in ("flops_before", "flops_after"):
            total[key] = sum(r[key] for r in self) if same else None
        return total

    def __rich__(self) -> RenderableType:
        return with_skipped(self._table(), self.skipped)

    def _table(self) -> Table:
        t = self.total
        unit = {"sample": "per sample", "position": "per output position", None: "mixed units"}
        table = Table(
            title="sparsenet pruning",
            show_footer=bool(self),
            caption=f"FLOPs = 2 x multiply-adds, {unit[t['flops_per']]}" if self else None,
        )
        table.add_column("layer", footer="total")
        table.add_column("type")
        table.add_column("shape")
        table.add_column("weights", justify="right", footer=f"{t['numel']:,}")
        table.add_column("pruned", justify="right", footer=f"{t['pruned']:,}")
        table.add_column("sparsity", justify="right", footer=f"{t['sparsity']:.2%}")
        table.add_column(
            "params", justify="right", footer=f"{_si(t['params_before'])} -> {_si(t['params_after'])}"
        )
        table.add_column(
            "FLOPs", justify="right", footer=f"{_si(t['flops_before'])} -> {_si(t['flops_after'])}"
        )
        for r in self:
            shape = "x".join(map(str, r["shape"]))
            flops = f"{_si(r['flops_before'])} -> {_si(r['flops_after'])}"
            if r["flops_per"] != t["flops_per"]:  # only in a mixed report: say which unit
                flops += "/pos" if r["flops_per"] == "position" else "/sample"
            table.add_row(
                r["name"], r["type"], shape, f"{r['numel']:,}", f"{r['pruned']:,}",
                f"{r['sparsity']:.2%}", f"{_si(r['params_before'])} -> {_si(r['params_after'])}",
                flops,
            )
        return table

    def __str__(self) -> str:
        buf = io.StringIO()
        Console(file=buf, width=140, color_system=None).print(self)
        return buf.getvalue().rstrip("\n")
