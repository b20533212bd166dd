"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored as packed CSR and run natively."""
from __future__ import annotations

import torch
from torch import nn
from torch.compiler import is_compiling

from sparsenet.formats import CSR, PackedCSR, hugepages
from sparsenet.ops.csr_linear import PreparedCSR, _needs_autograd, csr_linear


def _index_dtype(in_features: int) -> torch.dtype:
    return torch.uint16 if in_features <= 65536 else torch.int32


def _weight_storage(nnz: int, index_dtype: torch.dtype, values_dtype: torch.dtype, device: torch.device):
    """Uninitialised (col_indices, values). The values stream from memory on every call: on the CPU
    they go in a huge-page region (sparsenet.formats.hugepages). The kernels read the column indices
    from the native handle's own validated copy (in huge pages too), never from this tensor."""
    col = torch.empty(nnz, dtype=index_dtype, device=device)
    if device.type != "cpu":
        return col, torch.empty(nnz, dtype=values_dtype, device=device)
    return col, hugepages.empty_group([(nnz, values_dtype)])[0]


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W held as packed CSR; same forward semantics as ``nn.Linear``.

    The non-zero weights are a ``Parameter(requires_grad=False)`` named ``values`` so that a later
    fine-tuning feature keeps the same state_dict keys; the structure lives in the buffers
    ``crow_indices`` (int64) and ``col_indices`` (uint16 when ``in_features <= 65536``, else int32).
    Gradients flow to the input and the bias; the sparse weight is frozen.
    """

    # Built with inference mode off, even inside an inference_mode block: inference tensors carry no
    # version counter, which the op needs to notice in-place changes to the structure.
    @torch.inference_mode(False)
    def __init__(self, in_features: int, out_features: int, nnz: int = 0, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("nnz", nnz)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if nnz > in_features * out_features:
            raise ValueError(f"nnz={nnz} exceeds in_features * out_features = {in_features * out_features}")
        self.in_features = in_features
        self.out_features = out_features
        # An all-empty CSR: valid as it is (every row has no non-zeros).
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int64))
        col, values = _weight_storage(nnz, _index_dtype(in_features), torch.float32, torch.device("cpu"))
        self.register_buffer("col_indices", col.zero_())
        self.values = nn.Parameter(values.zero_(), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode(False)
    def from_packed(cls, packed: PackedCSR, bias: torch.Tensor | None = None) -> "SparseLinear":
        out_features, in_features = packed.shape
        layer = cls(in_features, out_features, nnz=0, bias=bias is not None)
        layer.crow_indices = packed.crow_indices.clone()
        layer.col_indices = packed.col_indices.clone()
        layer.values = nn.Parameter(hugepages.copy_group([packed.values])[0], requires_grad=False)
        if bias is not None:
            bias = torch.as_tensor(bias).detach()
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias.to(device="cpu", dtype=torch.float32).clone())
        return layer

    @classmethod
    def from_csr(cls, csr: CSR, bias: torch.Tensor | None = None) -> "SparseLinear":
        if not isinstance(csr, CSR):
            raise TypeError(f"csr must be a sparsenet.formats.CSR, got {type(csr).__name__}")
        return cls.from_packed(csr.pack(), bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "SparseLinear":
        """Convert an ``nn.Linear``: zeros (and entries where ``mask`` is False) are dropped.

        A layer pruned by ``sparsenet.prune`` or ``torch.nn.utils.prune`` is read through its mask.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        from sparsenet.pruning import effective_weight_and_mask

        weight, own_mask = effective_weight_and_mask(linear)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
                raise ValueError(f"mask must be a tensor of shape {tuple(weight.shape)}, got "
                                 f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
            own_mask = mask if own_mask is None else (own_mask & mask.to(own_mask.device))
        csr = CSR.from_dense(weight.detach().to(device="cpu", dtype=torch.float32), own_mask)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_csr(csr, bias)

    # ---- views --------------------------------------------------------------------------------
    def to_packed(self) -> PackedCSR:
        return PackedCSR(self.crow_indices, self.col_indices, self.values.detach(),
                         (self.out_features, self.in_features))

    def to_csr(self) -> CSR:
        return self.to_packed().to_csr()

    def to_dense_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.to_csr().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_compiling():  # imported by name: one global lookup less per call
            return csr_linear(x, self.crow_indices, self.col_indices, self.values, self.bias, self.in_features)
        # Straight from the registries: nn.Module.__getattr__ costs ~0.6 us per name at batch 1.
        buffers, params = self._buffers, self._parameters
        crow, col, values, bias = buffers["crow_indices"], buffers["col_indices"], params["values"], params["bias"]
        if not isinstance(x, torch.Tensor) or _needs_autograd(x, bias):
            return csr_linear(x, crow, col, values, bias, self.in_features)
        # Eager inference: the prepared fast path (see PreparedCSR), rebuilt when the tensors change.
        prepared = self.__dict__.get("_prepared")
        if prepared is None or not prepared.matches(crow, col, values, bias):
            if values.device.type != "cpu" or x.device.type != "cpu" or any(
                t is not None and t.is_inference() for t in (crow, col, values, bias)
            ):
                # Errors for other devices, and inference tensors (no version counters) are
                # re-validated on every call: both belong to the checked op path.
                return csr_linear(x, crow, col, values, bias, self.in_features)
            prepared = self.__dict__["_prepared"] = PreparedCSR(crow, col, values, bias, self.in_features)
        return prepared(x)

    def __getstate__(self):
        # The prepared fast path holds a native handle: rebuilt on demand, never copied or pickled.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_prepared", None)
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.4f}, nnz={self.nnz}, format=csr")

    # ---- state_dict with a different number of non-zeros ------------------------------------------
    @torch.inference_mode(False)
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = {n: prefix + n for n in ("crow_indices", "col_indices", "values")}
        if all(k in state_dict for k in keys.values()):
            crow, col, values = (state_dict[keys[n]] for n in ("crow_indices", "col_indices", "values"))
            try:
                PackedCSR(crow, col, values, (self.out_features, self.in_features))
            except (ValueError, TypeError) as e:
                error_msgs.append(f"{prefix or 'SparseLinear'}: invalid packed CSR in state_dict: {e}")
                return
            if values.numel() != self.values.numel():
                # Resize first; the default loader below then copies into tensors of the right size.
                new_col, new_values = _weight_storage(values.numel(), col.dtype, values.dtype, self.values.device)
                self.col_indices = new_col
                self.values = nn.Parameter(new_values, requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
