"""sparsenet: prune PyTorch models and run the pruned layers faster with native sparse kernels."""
from __future__ import annotations

# torch first: its OpenMP runtime is then the one the native module binds to, so torch and sparsenet
# share a single thread pool instead of two pools contending for the same cores.
import torch  # noqa: F401

from sparsenet._version import __version__  # noqa: E402

from sparsenet import formats, nn, ops, pruning, reconstruction, structure  # noqa: E402
from sparsenet.io import load, save  # noqa: E402
from sparsenet.nn import SparseConv2d, SparseLinear, densify, sparsify  # noqa: E402
from sparsenet.ops.runtime import (  # noqa: E402
    _init_from_environment,
    available_isas,
    get_isa,
    get_num_threads,
    release_output_cache,
    set_isa,
    set_num_threads,
    show_config,
)
from sparsenet.pruning import prune  # noqa: E402
from sparsenet.reconstruction import finetune, reconstruct  # noqa: E402
from sparsenet.structure import shrink  # noqa: E402

_init_from_environment()

__all__ = [
    "__version__", "formats", "nn", "ops", "pruning", "prune", "reconstruction", "reconstruct", "finetune", "structure", "shrink", "sparsify", "densify", "SparseLinear", "SparseConv2d", "save", "load",
    "set_num_threads", "get_num_threads", "set_isa", "get_isa", "available_isas", "show_config",
    "release_output_cache",
]
