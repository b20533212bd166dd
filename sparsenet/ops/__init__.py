"""Dispatch to native kernels: the only package that imports sparsenet's compiled modules."""
from sparsenet.ops.csr_linear import csr_linear
from sparsenet.ops.handles import cached_handles, csr_handle

__all__ = ["csr_linear", "csr_handle", "cached_handles"]
