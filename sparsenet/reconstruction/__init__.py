"""Recover what pruning removed: layer-wise solvers, block-wise fitting, fine-tuning, regrowth.

``reconstruct(model, calib, sparsity=...)`` prunes one-shot and rebuilds the kept weights from
calibration data, stage by stage (see :mod:`.walk`); the solvers themselves (:mod:`.solvers`)
work on plain matrices and can be used alone. After it, ``finetune`` trains the kept weights
with the masks held (optionally distilling from the dense model, optionally with RigL
regrowth) and ``recalibrate_batchnorm`` re-estimates BatchNorm statistics.
"""

from .api import ReconstructionResult, reconstruct
from .batchnorm import recalibrate_batchnorm
from .finetune import FinetuneResult, finetune
from .regrowth import RigL
from .solvers import LayerProblem, Solution, admm, lsq_refit, select_keep, sparsegpt

__all__ = [
    "FinetuneResult",
    "LayerProblem",
    "ReconstructionResult",
    "RigL",
    "Solution",
    "admm",
    "finetune",
    "lsq_refit",
    "recalibrate_batchnorm",
    "reconstruct",
    "select_keep",
    "sparsegpt",
]
