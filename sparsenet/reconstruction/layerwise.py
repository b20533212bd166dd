"""Solve one layer from its input statistics and write the result into the model.

Bridges modules and the matrix solvers: a layer's dense weight (the parametrization's stored
original when it is already masked) as a ``(rows, cols)`` matrix (a Conv1D's transpose: see
:func:`~sparsenet._weights.as_matrix`), its :class:`Gram`, and the installation of the solution,
back in the layer's own layout, as sparsenet's mask parametrization plus new weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .._weights import as_matrix, from_matrix, stored_weight
from ..calibration.gram import Gram
from ..pruning.masks import find_weight_mask, set_weight_mask
from ..pruning.structures import Structure
from .solvers import DEFAULT_DAMP, LayerProblem, Solution, admm, lsq_refit, select_keep, sparsegpt

METHODS = ("sparsegpt", "admm", "lsq")


def problem_for(layer: nn.Module, gram: Gram) -> LayerProblem:
    w = as_matrix(layer, stored_weight(layer).detach())
    bias = layer.bias.detach() if isinstance(getattr(layer, "bias", None), Tensor) else None
    mean = gram.mean() if bias is not None else None
    return LayerProblem(w, gram.hessian(), bias, mean)


def wanda_keep(problem: LayerProblem, sparsity: float, structure: Structure) -> Tensor:
    """Wanda's mask, ``|w| * ||x||``, from the same statistics the solvers use."""
    norms = torch.diagonal(problem.hessian).clamp_min(0).sqrt()
    return select_keep(problem.weight.abs() * norms[None, :], sparsity, structure)


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    method: str
    error: float  # relative output error on the calibration rows, after the solve


def solve(
    problem: LayerProblem,
    method: str,
    *,
    sparsity: Optional[float],
    keep: Optional[Tensor],
    structure: Structure,
    damp: float = DEFAULT_DAMP,
) -> Solution:
    """Run ``method`` with the solver choosing the mask (``sparsity``) or under ``keep``."""
    if method == "sparsegpt":
        return sparsegpt(problem, sparsity=sparsity, keep=keep, structure=structure, damp=damp)
    if method == "admm":
        return admm(problem, sparsity=sparsity, keep=keep, structure=structure, damp=damp)
    if method == "lsq":
        if keep is None:
            keep = wanda_keep(problem, sparsity, structure)
        return lsq_refit(problem, keep)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def install(layer: nn.Module, solution: Solution) -> None:
    """Mask the layer with the solution's keep-mask and write its weights and bias."""
    device = stored_weight(layer).device
    with torch.no_grad():
        set_weight_mask(layer, from_matrix(layer, solution.keep).to(device).contiguous())
        original = stored_weight(layer)
        original.copy_(from_matrix(layer, solution.weight).to(original.dtype))
        if solution.bias is not None:
            layer.bias.copy_(solution.bias.to(layer.bias.dtype))


def current_keep(layer: nn.Module) -> Optional[Tensor]:
    mask = find_weight_mask(layer)
    if mask is None:
        return None
    return as_matrix(layer, mask.mask)
