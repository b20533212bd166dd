"""Decide what to remove: criteria score weights, structures group them, scopes count them.

``prune(model, ...)`` keeps a bool mask beside each weight (a parametrization) until
``Pruner.finalize()`` writes the zeros; with ``schedule=`` (see :mod:`.schedules`) the
sparsity rises gradually as the training loop calls ``Pruner.step()``.
``import_torch_pruning`` / ``export_to_torch_pruning`` hand masks to and from
torch.nn.utils.prune; ``effective_weight_and_mask`` and ``remove_pruning`` let later stages
read or bake masks from sparsenet or from torch.nn.utils.prune alike. ``owl_sparsities`` and
``search_sparsities`` give non-uniform per-layer sparsities (``prune(..., allocation=...)``).
"""

from .criteria import Layer, ScoreContext, available_criteria, get_criterion, register_criterion
from .flops import output_positions
from .interop import export_to_torch_pruning, import_torch_pruning
from .layers import PRUNABLE_TYPES, find_prunable_layers
from .masks import MASK_FORMAT_VERSION, WeightMask, effective_weight_and_mask, find_weight_mask, remove_pruning
from .nonuniform import block_groups, owl_sparsities, search_sparsities
from .pruner import Pruner, prune
from .report import PruningReport
from .schedules import CubicSchedule, CustomSchedule, LinearSchedule, PruningStep, Schedule
from .scope import available_scopes
from .structures import NM, Block, Channel, Structure, Unstructured, available_structures

__all__ = [
    "Block",
    "Channel",
    "CubicSchedule",
    "CustomSchedule",
    "Layer",
    "MASK_FORMAT_VERSION",
    "LinearSchedule",
    "NM",
    "PRUNABLE_TYPES",
    "Pruner",
    "PruningReport",
    "PruningStep",
    "Schedule",
    "ScoreContext",
    "Structure",
    "Unstructured",
    "WeightMask",
    "available_criteria",
    "available_scopes",
    "available_structures",
    "block_groups",
    "effective_weight_and_mask",
    "export_to_torch_pruning",
    "find_prunable_layers",
    "find_weight_mask",
    "get_criterion",
    "import_torch_pruning",
    "output_positions",
    "owl_sparsities",
    "register_criterion",
    "prune",
    "remove_pruning",
    "search_sparsities",
]
