"""Drop-in sparse modules and the model-level conversions."""
from sparsenet.nn.convert import SparsifyReport, densify, sparsify
from sparsenet.nn.linear import SparseLinear

__all__ = ["SparseLinear", "sparsify", "densify", "SparsifyReport"]
