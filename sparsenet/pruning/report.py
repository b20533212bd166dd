"""Per-layer sparsity report: a list of dicts that prints as a table."""

from __future__ import annotations

import io
from typing import Mapping

from rich.console import Console
from rich.table import Table
from torch import Tensor, nn


class PruningReport(list):
    """One dict per layer: ``name, type, shape, numel, pruned, sparsity`` (from the masks).

    It is a plain list for code (``report[0]["sparsity"]``, ``json.dumps(list(report))``) and
    renders as a table for people (``print(report)`` or ``rich.print(report)``).
    """

    @classmethod
    def from_masks(
        cls, masks: Mapping[str, Tensor], modules: Mapping[str, nn.Module]
    ) -> "PruningReport":
        rows = []
        for name, mask in masks.items():
            numel = mask.numel()
            pruned = numel - int(mask.sum())
            rows.append(
                {
                    "name": name,
                    "type": type(modules[name]).__name__.removeprefix("Parametrized"),
                    "shape": tuple(mask.shape),
                    "numel": numel,
                    "pruned": pruned,
                    "sparsity": pruned / numel if numel else 0.0,
                }
            )
        return cls(rows)

    @property
    def total_sparsity(self) -> float:
        numel = sum(r["numel"] for r in self)
        return sum(r["pruned"] for r in self) / numel if numel else 0.0

    def __rich__(self) -> Table:
        table = Table(title="sparsenet pruning", show_footer=bool(self))
        numel = sum(r["numel"] for r in self)
        pruned = sum(r["pruned"] for r in self)
        table.add_column("layer", footer="total")
        table.add_column("type")
        table.add_column("shape")
        table.add_column("weights", justify="right", footer=f"{numel:,}")
        table.add_column("pruned", justify="right", footer=f"{pruned:,}")
        table.add_column("sparsity", justify="right", footer=f"{self.total_sparsity:.2%}")
        for r in self:
            shape = "x".join(map(str, r["shape"]))
            table.add_row(
                r["name"], r["type"], shape, f"{r['numel']:,}", f"{r['pruned']:,}",
                f"{r['sparsity']:.2%}",
            )
        return table

    def __str__(self) -> str:
        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None).print(self)
        return buf.getvalue().rstrip("\n")
