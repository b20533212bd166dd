"""Dispatch to native kernels: the only package that imports sparsenet's compiled modules."""
from sparsenet.ops.csr_linear import csr_linear
from sparsenet.ops.bitmap_linear import bitmap_linear
from sparsenet.ops.csr_conv2d import csr_conv2d
from sparsenet.formats import PackedBSR, PackedNM
from sparsenet.ops.format_linear import define_linear_op
from sparsenet.ops.handles import bitmap_handle, cached_handles, csr_handle, native_handle
from sparsenet.ops import cuda  # noqa: F401  (registers the CUDA kernels, where built, for the ops above)

bsr_linear = define_linear_op(PackedBSR)
nm_linear = define_linear_op(PackedNM)

__all__ = ["csr_linear", "csr_conv2d", "bitmap_linear", "bsr_linear", "nm_linear", "csr_handle", "bitmap_handle", "native_handle",
           "cached_handles", "LINEAR_OPS"]

# The eager entry point of each registered format's linear op:
# (x, *structure, values, bias, in_features, out_features).
LINEAR_OPS = {"csr": csr_linear, "bitmap": bitmap_linear, "bsr": bsr_linear, "nm": nm_linear}
