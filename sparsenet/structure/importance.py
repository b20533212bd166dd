"""How important each channel (or head) of a group is: lower scores are removed first.

* ``magnitude``: the norm of every weight a channel owns -- its producer rows, norm parameters and
  the consumer columns that read it -- with the same root-mean-square ``structure="channel"`` uses.
* ``activation``: what a channel carries on to the layers that read it, on calibration data: the
  norm of its values at each reader's input times the norm of the weights that read them (the
  input statistics Wanda and the activation criterion use), summed over readers.
* ``taylor``: ``|w dL/dw|`` summed over the layer weights a channel owns, on calibration data (the
  pruning package's Taylor criterion): the first-order change of the loss when it is removed.
* ``obs``: the second-order cost of removal (Optimal Brain Surgeon applied to whole structures, as
  in ZipLM / SlimGPT): removing a unit's input block ``B`` from a reader ``W`` and optimally
  refitting the rest costs ``tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ)``, ``H`` the reader's input Gram on calibration
  data. Units are removed greedily, cheapest first, each removal updating ``W`` and ``H⁻¹`` (so the
  next cost is that after the refit); a unit's score is the relative output error once it and
  every unit before it are gone. Scores are thus comparable across groups, and a group's
  cheapest units are exactly its greedy removal order.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .._weights import as_matrix, is_conv1d, stored_weight
from ..calibration import capture_input_sq_norms
from ..calibration.gram import capture_grams
from ..pruning.layers import is_prunable
from ..pruning.structures import _group_score
from .graph import Group, Member

IMPORTANCES = ("magnitude", "activation", "taylor", "obs")


def reader_dim(module: nn.Module) -> Optional[int]:
    """The weight dim a layer reads its input features along (None: not a plain reader)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return None
    if is_conv1d(module):
        return 0
    return 1 if is_prunable(module) else None


def _readers(model: nn.Module, groups: list[Group]) -> dict[str, nn.Module]:
    """Layers whose input features are members of ``groups``, by name."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for g in groups:
        for m in g.members:
            layer = _reader_of(m, modules)
            if layer is not None:
                found[m.name.rpartition(".")[0]] = layer
    return found


def _reader_of(m: Member, modules: dict[str, nn.Module]) -> Optional[nn.Module]:
    layer_name, _, attr = m.name.rpartition(".")
    layer = modules.get(layer_name)
    if attr == "weight" and layer is not None and reader_dim(layer) == m.dim:
        return layer
    return None


def _positions(m: Member, unit: int) -> slice:
    start = m.offset + (unit - m.first) * m.repeat
    return slice(start, start + m.repeat)


def magnitude_scores(groups: list[Group], tensors: dict[str, Tensor]) -> list[Tensor]:
    # Parameters only: running statistics are no weights.
    weights = {name: t for name, t in tensors.items() if isinstance(t, nn.Parameter)}
    return [_group_score(_unit_matrix(g, weights).abs(), "l2") for g in groups]


def taylor_scores(model: nn.Module, groups: list[Group], calib: Iterable, loss_fn) -> list[Tensor]:
    """Per channel, the sum of ``|w dL/dw|`` over the layer weights it owns (producer rows, reader
    columns), from the pruning package's Taylor criterion: the first-order loss change of removing
    it."""
    from ..pruning.gradients import taylor_scores as weight_scores

    modules = dict(model.named_modules())
    layers = {}
    for g in groups:
        for m in g.members:
            layer_name, _, attr = m.name.rpartition(".")
            if attr == "weight" and is_prunable(modules.get(layer_name, nn.Identity())):
                layers[layer_name] = modules[layer_name]
    scores = weight_scores(model, layers, calib, loss_fn)
    per_weight = {f"{name}.weight": s for name, s in scores.items()}
    return [_unit_matrix(g, per_weight).abs().sum(dim=1) for g in groups]


def _unit_matrix(group: Group, tensors: dict[str, Tensor]) -> Tensor:
    """(channels, values per channel): the entries of ``tensors`` (by member name) a channel of
    ``group`` owns; members not in ``tensors`` are left out."""
    pieces = []
    for m in group.members:
        t = tensors.get(m.name)
        if t is None:
            continue
        span = t.detach().movedim(m.dim, 0)[m.offset:m.offset + m.length * m.repeat]
        piece = span.reshape(m.length, -1).float()
        full = torch.zeros(group.size, piece.shape[1])
        full[m.first:m.first + m.length] = piece
        pieces.append(full)
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(group.size, 0)


def activation_scores(model: nn.Module, groups: list[Group], calib: Iterable) -> list[Tensor]:
    readers = _readers(model, groups)
    norms = capture_input_sq_norms(model, readers, calib) if readers else {}
    modules = dict(model.named_modules())
    scores = []
    for g in groups:
        score = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            layer = _reader_of(m, modules)
            if layer is None:
                continue
            w = stored_weight(layer).detach().double().movedim(m.dim, 0)
            column = w.reshape(w.shape[0], -1).norm(dim=1)  # per input feature / channel
            x = norms[m.name.rpartition(".")[0]].double().clamp_min(0).sqrt().to(column.device)
            span = slice(m.offset, m.offset + m.length * m.repeat)
            score[m.first:m.first + m.length] += (x[span] * column[span]).reshape(m.length, m.repeat).sum(dim=1).cpu()
        scores.append(score.float())
    return scores


class _Reader:
    """One reader of a group, as the OBS greedy sees it: ``W`` (out, inputs), ``H⁻¹`` of its inputs,
    and each unit's input positions there."""

    def __init__(self, weight: Tensor, hinv: Tensor, blocks: dict[int, list[int]]) -> None:
        self.w, self.hinv, self.blocks = weight, hinv, blocks

    def costs(self, units: list[int]) -> Tensor:
        """``tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ)`` for each unit's block ``B`` (0 where it has none here)."""
        out = torch.zeros(len(units), dtype=torch.float64)
        have = [(i, self.blocks[u]) for i, u in enumerate(units) if u in self.blocks]
        if not have:
            return out
        idx = torch.tensor([b for _, b in have])  # (k, block)
        hbb = self.hinv[idx[:, :, None], idx[:, None, :]]  # (k, block, block)
        wb = self.w[:, idx].permute(1, 0, 2)  # (k, out, block)
        solved = torch.linalg.solve(hbb, wb.transpose(1, 2))  # (k, block, out)
        cost = (wb * solved.transpose(1, 2)).sum(dim=(1, 2))
        out[torch.tensor([i for i, _ in have])] = cost
        return out

    def remove(self, unit: int) -> None:
        """Take the unit out and refit the rest optimally (the OBS update of W and of H⁻¹)."""
        b = self.blocks.pop(unit, None)
        if b is None:
            return
        k = torch.linalg.inv(self.hinv[b][:, b])
        self.w = self.w - self.w[:, b] @ k @ self.hinv[b, :]
        self.hinv = self.hinv - self.hinv[:, b] @ k @ self.hinv[b, :]


def obs_scores(model: nn.Module, groups: list[Group], calib: Iterable, damp: float,
               fallback: list[Tensor]) -> list[Tensor]:
    readers = _readers(model, groups)
    grams = capture_grams(model, readers, calib) if readers else {}
    modules = dict(model.named_modules())
    scores = []
    for g, backup in zip(groups, fallback):
        parts, energy = [], 0.0
        for m in g.members:
            layer = _reader_of(m, modules)
            name = m.name.rpartition(".")[0]
            if layer is None or name not in grams:
                continue
            weight = stored_weight(layer).detach()
            w = as_matrix(layer, weight).double().cpu()  # (out, inputs): a convolution's are patches
            k = w.shape[1] // weight.shape[m.dim]  # matrix columns per input feature (kernel taps)
            h = grams[name].hessian().double().cpu()
            h = h + damp * float(torch.diagonal(h).mean() or 1.0) * torch.eye(h.shape[0], dtype=h.dtype)
            blocks = {u: [c for p in range(_positions(m, u).start, _positions(m, u).stop)
                          for c in range(p * k, (p + 1) * k)]
                      for u in range(m.first, m.first + m.length)}
            parts.append(_Reader(w, torch.linalg.inv(h), blocks))
            energy += float(torch.trace(w @ h @ w.T))
        if not parts:
            scores.append(backup)  # nothing reads it as a plain layer: rank by magnitude
            continue
        scores.append(_greedy(g.size, parts, max(energy, 1e-30)))
    return scores


def _greedy(size: int, readers: list[_Reader], energy: float) -> Tensor:
    """Relative output error once each unit and all cheaper ones are removed (greedy OBS)."""
    remaining = list(range(size))
    score = torch.full((size,), float("inf"), dtype=torch.float64)
    total = 0.0
    while len(remaining) > 1:
        costs = sum(r.costs(remaining) for r in readers)
        pick = int(torch.argmin(costs))
        unit = remaining.pop(pick)
        total += float(costs[pick].clamp_min(0))
        score[unit] = total / energy
        for r in readers:
            r.remove(unit)
    score[remaining[0]] = max(total / energy, 0.0) * 2 + 1.0  # the last unit is never removed
    return score.float()
