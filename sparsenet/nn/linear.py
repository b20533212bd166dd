"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored as packed CSR and run natively."""
from __future__ import annotations

import torch
from torch import nn
from torch.compiler import is_compiling
from torch.utils._python_dispatch import _disable_current_modes

from sparsenet._weights import as_matrix, is_linear
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


class WeightStandIn(torch.Tensor):
    """What ``SparseLinear.weight`` returns (see there): a data-less meta tensor that answers
    questions about itself (dtype, shape, device, ...) and refuses every computation.

    The refusal must be explicit: torch runs some ops on a meta tensor mixed with CPU tensors and
    returns uninitialised CPU memory (``F.linear(x, meta_weight)`` does), a silently wrong result.
    Having a ``__torch_function__`` also makes ``torch.overrides.has_torch_function`` true for it,
    which sends torch's fused transformer paths to their plain, layer-calling code.
    """

    _READABLE = frozenset({
        "dtype", "shape", "device", "size", "dim", "ndim", "ndimension", "numel", "nelement",
        "element_size", "itemsize", "is_floating_point", "is_complex", "is_signed", "requires_grad",
        "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_leaf", "layout", "names",
        "__repr__", "__format__", "__len__", "__hash__",
    })

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):  # a property: name it by its descriptor
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name not in cls._READABLE:
            raise RuntimeError(
                f"SparseLinear.weight is a stand-in without data (the layer holds its weight sparse): "
                f"{name or func} cannot run on it; call the layer itself, or use to_csr().to_dense()"
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


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
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None) -> "SparseLinear":
        """Convert an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's Linear with a transposed
        weight): zeros (and entries where ``mask``, in the layer's own weight layout, is False) are
        dropped.

        A layer pruned by ``sparsenet.prune`` or ``torch.nn.utils.prune`` is read through its mask.
        """
        if not is_linear(linear):
            raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        from sparsenet._masks import effective_weight_and_mask

        weight, own_mask = effective_weight_and_mask(linear)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
                raise ValueError(f"mask must be a tensor of shape {tuple(weight.shape)}, got "
                                 f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
            own_mask = mask if own_mask is None else (own_mask & mask.to(own_mask.device))
        weight = as_matrix(linear, weight.detach())  # (out, in): transposed for Conv1D
        own_mask = None if own_mask is None else as_matrix(linear, own_mask)
        csr = CSR.from_dense(weight.to(device="cpu", dtype=torch.float32).contiguous(),
                             None if own_mask is None else own_mask.contiguous())
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
    def weight(self) -> torch.Tensor:
        """A stand-in for code that reads a Linear's ``weight`` for its attributes (T5 checks
        ``wo.weight.dtype``; torch's ``TransformerEncoder``/``TransformerEncoderLayer`` inspect
        ``linear1.weight`` before taking their fused path): a *meta* tensor with the dense weight's
        shape and dtype and no data, of a subclass that overrides ``__torch_function__``.

        Nothing can compute with it, by design: a fused path that took the weight itself and never
        called ``forward`` would give silently wrong results. torch's fused paths refuse tensors with
        a ``__torch_function__`` (and meta tensors) and call the layers instead, and any other
        computation with it fails loudly. The real weight: ``to_csr().to_dense()``.
        """
        # Made outside any active dispatch mode (torch.export's fake tensors, proxies): the stand-in
        # is a plain meta tensor, not a traced value.
        with _disable_current_modes():
            meta = torch.empty((self.out_features, self.in_features), dtype=self.values.dtype, device="meta")
            return meta.as_subclass(WeightStandIn)

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

    def _apply(self, fn, recurse=True):
        # nn.Module.to / half / bfloat16 / double all come through here. The packed values and the
        # kernels are float32 only: refuse a dtype change now, before this layer changes, instead
        # of failing at the first forward. (Modules visited before this one are already converted.)
        probe = fn(torch.zeros(1))
        if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
            raise TypeError(
                f"SparseLinear holds float32 values (its kernels run float32), so it cannot become "
                f"{str(probe.dtype).removeprefix('torch.')}: change the model's dtype before sparsify, "
                f"or leave the sparse layers float32"
            )
        return super()._apply(fn, recurse)

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
