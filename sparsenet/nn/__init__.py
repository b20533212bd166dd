"""Drop-in sparse modules and the model-level conversions."""
from sparsenet.nn.conv import SparseConv2d
from sparsenet.nn.convert import SparsifyReport, densify, sparsify
from sparsenet.nn.linear import SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "sparsify", "densify", "SparsifyReport"]
