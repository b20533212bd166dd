"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored in a registered sparse format (packed
CSR by default, bitmap or block-sparse BSR) and run natively."""
from __future__ import annotations

import torch
from torch import nn
from torch.compiler import is_compiling
from torch.utils._python_dispatch import _disable_current_modes

from sparsenet._weights import as_matrix, is_linear
from sparsenet.formats import CSR, PackedCSR, hugepages, registry
from sparsenet.ops import LINEAR_OPS
from sparsenet.ops.csr_linear import PreparedSparse, _needs_autograd


def _index_dtype(in_features: int) -> torch.dtype:
    return torch.uint16 if in_features <= 65536 else torch.int32


def _values_storage(nnz: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised values. They stream from memory on every call: on the CPU they go in a
    huge-page region (sparsenet.formats.hugepages). The kernels read the structure from the native
    handle's own validated copy (in huge pages too), never from the module's buffers."""
    if device.type != "cpu":
        return torch.empty(nnz, dtype=dtype, device=device)
    return hugepages.empty_group([(nnz, dtype)])[0]


# Each format's structure buffers, in the order its op takes them.
_STRUCTURE = {name: registry.get(name).STRUCTURE for name in registry.names()}


class WeightStandIn(torch.Tensor):
    """What ``SparseLinear.weight`` / ``SparseConv2d.weight`` return (see there): a data-less meta tensor that answers
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
                f"{name or func} cannot run on it; call the layer itself, or use to_dense()"
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class SparseWeightModule(nn.Module):
    """What every sparse layer (``SparseLinear``, ``SparseConv2d``) shares: its weight is a packed
    matrix of a registered format, shape :attr:`packed_shape`, held as the format's structure buffers
    and a ``values`` Parameter; float32 only; a ``weight`` stand-in; state_dicts with another number
    of stored weights load (the tensors are resized first)."""

    format: str
    packed_shape: tuple[int, int]  # (rows, cols) of the packed matrix
    weight_shape: tuple[int, ...]  # of the dense layer's weight

    def to_packed(self):
        """The weight as its format's packed object (validated; on the CPU, float32 values)."""
        spec = registry.get(self.format)
        tensors = {name: getattr(self, name) for name in spec.STRUCTURE}
        return spec.from_tensors(registry.packable({**tensors, "values": self.values}), self.packed_shape)

    def _like_values(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the values' device, in their dtype (a CUDA or half-precision layer's dense views)."""
        return t.to(self.values.device, self.values.dtype)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.packed_shape[0] * self.packed_shape[1]
        return self.nnz / total if total else 0.0

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in for code that reads a layer's ``weight`` for its attributes (T5 checks
        ``wo.weight.dtype``; torch's ``TransformerEncoder``/``TransformerEncoderLayer`` inspect
        ``linear1.weight`` before taking their fused path): a *meta* tensor with the dense weight's
        shape and dtype and no data, of a subclass that overrides ``__torch_function__``.

        Nothing can compute with it, by design: a fused path that took the weight itself and never
        called ``forward`` would give silently wrong results. torch's fused paths refuse tensors with
        a ``__torch_function__`` (and meta tensors) and call the layers instead, and any other
        computation with it fails loudly. The real weight: ``to_dense()``.
        """
        # Made outside any active dispatch mode (torch.export's fake tensors, proxies): the stand-in
        # is a plain meta tensor, not a traced value.
        with _disable_current_modes():
            meta = torch.empty(self.weight_shape, dtype=self.values.dtype, device="meta")
            return meta.as_subclass(WeightStandIn)

    def _apply(self, fn, recurse=True):
        # nn.Module.to / half / bfloat16 / double all come through here. The CPU kernels run float32,
        # the CUDA ones float16 and bfloat16 too: refuse any other dtype now, before this layer
        # changes, instead of failing at the first forward. (Modules visited before this one are
        # already converted.)
        probe = fn(torch.zeros(1))
        if isinstance(probe, torch.Tensor) and probe.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"{type(self).__name__} holds float32 values (float16 or bfloat16 for its CUDA kernels), so it "
                f"cannot become {str(probe.dtype).removeprefix('torch.')}: change the model's dtype before "
                f"sparsify, or leave the sparse layers float32"
            )
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # A prepared fast path holds a native handle: rebuilt on demand, never copied or pickled.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_prepared", None)
        return state

    # ---- state_dict with a different number of non-zeros ------------------------------------------
    @torch.inference_mode(False)
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        spec = registry.get(self.format)
        names = (*spec.STRUCTURE, "values")
        if all(prefix + n in state_dict for n in names):
            given = {n: state_dict[prefix + n] for n in names}
            try:
                spec.from_tensors(registry.packable(given), self.packed_shape)
            except (ValueError, TypeError) as e:
                error_msgs.append(f"{prefix or type(self).__name__}: invalid packed {self.format} weight in "
                                  f"state_dict: {e}")
                return
            # Tensors whose size follows the number of non-zeros are resized first; the default
            # loader below then copies into tensors of the right size.
            for name in names:
                own = self.values if name == "values" else self._buffers[name]
                if given[name].numel() == own.numel():
                    continue
                if name == "values":
                    new = _values_storage(given[name].numel(), given[name].dtype, own.device)
                    self.values = nn.Parameter(new, requires_grad=self.values.requires_grad)
                else:
                    self._buffers[name] = torch.empty_like(given[name], device=own.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SparseLinear(SparseWeightModule):
    """y = x @ W.T + b with W held in a sparse ``format``; same forward semantics as ``nn.Linear``.

    The stored weights are a ``Parameter(requires_grad=False)`` named ``values``; the structure lives
    in the format's buffers (:mod:`sparsenet.formats.registry`): for ``"csr"`` (the default)
    ``crow_indices`` (int64) and ``col_indices`` (uint16 when ``in_features <= 65536``, else int32),
    for ``"bitmap"`` ``masks`` (uint16, a bit per position) and ``row_ptr`` (int64), for ``"bsr"``
    ``block_shape`` (int64 (r, c)), ``block_ptr`` (int64) and ``block_cols`` (int32). Gradients flow
    to the input and the bias; the sparse weight is frozen.
    """

    # Built with inference mode off, even inside an inference_mode block: inference tensors carry no
    # version counter, which the op needs to notice in-place changes to the structure.
    @torch.inference_mode(False)
    def __init__(self, in_features: int, out_features: int, nnz: int = 0, bias: bool = True,
                 format: str = "csr") -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("nnz", nnz)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if nnz > in_features * out_features:
            raise ValueError(f"nnz={nnz} exceeds in_features * out_features = {in_features * out_features}")
        spec = registry.get(format)
        self.in_features = in_features
        self.out_features = out_features
        self.format = spec.FORMAT
        if self.format == "csr":
            # An all-empty CSR: valid as it is (every row has no non-zeros).
            self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int64))
            self.register_buffer("col_indices", torch.zeros(nnz, dtype=_index_dtype(in_features)))
            self.values = nn.Parameter(_values_storage(nnz, torch.float32, torch.device("cpu")).zero_(),
                                       requires_grad=False)
        else:  # the format's empty weight: its structure says where nnz values would go, so none
            if nnz:
                raise ValueError(f"nnz must be 0 for format {format!r} (its structure places the values): "
                                 "build it with from_dense or from_packed")
            empty = spec.empty(out_features, in_features).tensors()
            for name in spec.STRUCTURE:
                self.register_buffer(name, empty[name])
            self.values = nn.Parameter(empty["values"], requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode(False)
    def from_packed(cls, packed, bias: torch.Tensor | None = None) -> "SparseLinear":
        """From a packed weight of any registered format (``PackedCSR``, ``PackedBitmap``, ``PackedBSR``)."""
        spec = registry.get(getattr(packed, "FORMAT", None))
        if not isinstance(packed, spec):
            raise TypeError(f"packed must be a registered packed format, got {type(packed).__name__}")
        out_features, in_features = packed.shape
        layer = cls(in_features, out_features, nnz=0, bias=bias is not None, format=spec.FORMAT)
        tensors = packed.tensors()
        for name in spec.STRUCTURE:
            setattr(layer, name, tensors[name].clone())
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
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, format: str = "csr",
                   **options) -> "SparseLinear":
        """Convert an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's Linear with a transposed
        weight) to ``format``: zeros (and entries where ``mask``, in the layer's own weight layout,
        is False) are dropped. ``options`` go to the format's ``from_dense`` (``block=(r, c)`` for
        ``"bsr"``).

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
        packed = registry.get(format).from_dense(weight.to(device="cpu", dtype=torch.float32).contiguous(),
                                                 None if own_mask is None else own_mask.contiguous(), **options)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_packed(packed, bias)

    # ---- views --------------------------------------------------------------------------------
    @property
    def packed_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def to_dense(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, on the layer's device in its dtype."""
        return self._like_values(self.to_packed().to_dense())

    def to_csr(self) -> CSR:
        """The weight as a CSR (from another format: its non-zeros)."""
        packed = self.to_packed()
        return packed.to_csr() if isinstance(packed, PackedCSR) else CSR.from_dense(packed.to_dense())

    def to_dense_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Straight from the registries: nn.Module.__getattr__ costs ~0.6 us per name at batch 1.
        buffers, params = self._buffers, self._parameters
        values, bias = params["values"], params["bias"]
        prepared = self.__dict__.get("_prepared")
        eager = not is_compiling() and isinstance(x, torch.Tensor) and not _needs_autograd(x, bias)
        if eager and prepared is not None:
            if prepared.matches(buffers, values, bias):
                return prepared(x)  # eager inference: the prepared fast path (see PreparedSparse)
            del self.__dict__["_prepared"]  # stale: it would keep the old tensors alive
        names = _STRUCTURE[self.format]
        structure = tuple(buffers[name] for name in names)
        if not eager or values.device.type != "cpu" or x.device.type != "cpu" or any(
            t is not None and t.is_inference() for t in (*structure, values, bias)
        ):
            # The checked op of this format (csr_linear, bitmap_linear, bsr_linear): compiled graphs,
            # autograd, errors for other devices, and inference tensors (no version counters, so
            # re-validated on every call).
            return LINEAR_OPS[self.format](x, *structure, values, bias, self.in_features, self.out_features)
        # (Re)built when the tensors change.
        prepared = self.__dict__["_prepared"] = PreparedSparse(names, structure, values, bias, self.in_features,
                                                               self.out_features, self.format)
        return prepared(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.4f}, nnz={self.nnz}, format={self.format}")
