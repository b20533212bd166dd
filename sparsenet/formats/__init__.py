"""Compact storage formats for sparse weights (pure data + torch; no kernels)."""
from sparsenet.formats.bitmap import PackedBitmap
from sparsenet.formats.bsr import PackedBSR
from sparsenet.formats.nm import PackedNM
from sparsenet.formats.csr import CSR, PackedCSR
from sparsenet.formats import registry

__all__ = ["CSR", "PackedCSR", "PackedBitmap", "PackedBSR", "PackedNM", "registry"]
