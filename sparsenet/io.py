"""Save and load sparse models as safetensors files: no pickle, validated before anything is loaded.

A file holds the model's whole ``state_dict`` (sparse layers as their packed CSR tensors, everything
else as is) plus one JSON document under the key ``"sparsenet"`` of the safetensors header metadata::

    {"format": "sparsenet", "file_format_version": 1, "sparsenet_version": "0.1.0",
     "modules": [{"name": "fc1", "type": "SparseLinear", "format": "csr", "version": 1,
                  "shape": [out, in], "nnz": 1234, "index_dtype": "uint16"}, ...],
     "aliases": {"head.weight": "embed.weight"},   # tied tensors, stored once
     "dtype_views": {"fc1.col_indices": "uint16"},  # stored bit-for-bit as int16
     "crc32": {"fc1.values": 123456789, ...},        # per stored tensor
     "stored_bytes": ..., "dense_bytes": ...}

Design choices, and why:

* Tied tensors (several names, one tensor) are stored once and listed in ``aliases``; on load every
  name gets the data again, so a tied skeleton stays tied and an untied one gets equal copies. Tensors
  that merely overlap in memory without being the same view are saved as copies.
* Unsigned index dtypes are stored reinterpreted as the signed dtype of the same width, because only
  recent safetensors releases know ``torch.uint16``; the bits are unchanged.
* safetensors has no checksums, and a flipped byte in a weight would load silently, so each tensor's
  CRC-32 is recorded and checked.
* ``load`` checks the whole file against the skeleton (names, shapes, dtypes, packed-CSR invariants,
  checksums, versions) before it copies a single tensor, so a bad file raises ValueError and leaves
  the skeleton untouched.
"""
from __future__ import annotations

import json
import os
import uuid
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from sparsenet.formats import PackedCSR

FILE_FORMAT_VERSION = 1
_METADATA_KEY = "sparsenet"
_MAGIC = "sparsenet"
# Unsigned dtypes older safetensors releases cannot write, and the same-width dtype stored instead.
_STORED_AS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_DTYPE_BY_NAME = {str(d).removeprefix("torch."): d for d in _STORED_AS}


# ---- helpers shared by save and load ---------------------------------------------------------------

def _sparse_modules(model: nn.Module) -> dict[str, nn.Module]:
    from sparsenet.nn import SparseLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _checksum(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(raw.numpy()) if raw.numel() else 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sparsenet_version() -> str:
    import sparsenet

    version = getattr(sparsenet, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("sparsenet")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# ---- save ----------------------------------------------------------------------------------------

def _split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (each backed by its own memory) and the alias -> stored-name map."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_view: dict[tuple, str] = {}
    storages: dict[tuple, int] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0:
            stored[name] = t.cpu()
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in first_view:
            aliases[name] = first_view[view]
            continue
        first_view[view] = name
        storages[storage] = storages.get(storage, 0) + 1
        # safetensors refuses tensors sharing memory: overlapping-but-different views become copies.
        shared = storages[storage] > 1 or t.untyped_storage().nbytes() != _nbytes(t)
        t = t.cpu()
        stored[name] = t.clone() if shared or not t.is_contiguous() else t
    return stored, aliases


def _module_entries(model: nn.Module) -> list[dict]:
    entries = []
    for name, m in _sparse_modules(model).items():
        packed = m.to_packed()  # validates: a broken layer fails here, not when the file is read
        entries.append({"name": name, "type": type(m).__name__, **packed.metadata()})
    return entries


def size_report(model: nn.Module) -> "SizeReport":
    """Bytes the model's tensors take as stored by ``save`` vs with every sparse layer dense float32."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    stored, _ = _split_aliases(model.state_dict())
    return _size_of(model, stored)


def _size_of(model: nn.Module, stored: dict[str, torch.Tensor]) -> "SizeReport":
    stored_bytes = sum(_nbytes(t) for t in stored.values())
    dense_bytes = stored_bytes
    for name, m in _sparse_modules(model).items():
        p = _prefix(name)
        dense_bytes -= sum(_nbytes(stored[p + k]) for k in ("crow_indices", "col_indices", "values") if p + k in stored)
        dense_bytes += m.out_features * m.in_features * 4
    return SizeReport(stored_bytes, dense_bytes)


@dataclass(frozen=True)
class SizeReport:
    stored_bytes: int
    dense_bytes: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def __str__(self) -> str:
        return (f"{self.stored_bytes:,} bytes stored vs {self.dense_bytes:,} bytes dense "
                f"({self.ratio:.1%}, {1 / self.ratio if self.ratio else float('inf'):.2f}x smaller)")


def save(model: nn.Module, path: str | os.PathLike) -> SizeReport:
    """Write ``model.state_dict()`` and sparsenet's metadata to a safetensors file at ``path``.

    The file is written next to ``path`` and renamed into place, so a failed save never leaves a
    truncated file behind. Returns the sizes (stored vs dense) of what was written.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = _module_entries(model)
    stored, aliases = _split_aliases(model.state_dict())
    report = _size_of(model, stored)
    dtype_views = {}
    for name, t in list(stored.items()):
        if t.dtype in _STORED_AS:
            dtype_views[name] = str(t.dtype).removeprefix("torch.")
            stored[name] = t.view(_STORED_AS[t.dtype])
    header = {
        "format": _MAGIC,
        "file_format_version": FILE_FORMAT_VERSION,
        "sparsenet_version": _sparsenet_version(),
        "modules": modules,
        "aliases": aliases,
        "dtype_views": dtype_views,
        "crc32": {name: _checksum(t) for name, t in stored.items()},
        "stored_bytes": report.stored_bytes,
        "dense_bytes": report.dense_bytes,
    }
    path = os.fspath(path)
    # A unique name in the same directory: os.replace is atomic only within one filesystem.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(stored, tmp, metadata={_METADATA_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return report


# ---- load ----------------------------------------------------------------------------------------

def _read(path: str | os.PathLike, with_tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The parsed sparsenet header and (optionally) the stored tensors, or ValueError."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"cannot load {path!r}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata()
            names = list(f.keys())
            header = _parse_header(path, raw)  # before reading any tensor: cheap refusals first
            tensors = {n: f.get_tensor(n) for n in names} if with_tensors else {}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own error type differs across releases; OSError too
        raise ValueError(f"cannot load {path!r}: not a readable safetensors file ({e})") from e
    stored = set(header["crc32"])
    if stored != set(names):
        raise ValueError(f"{path!r}: the checksums do not list the stored tensors; the file was altered")
    return header, tensors


def _parse_header(path: str, raw: dict | None) -> dict:
    if not raw or _METADATA_KEY not in raw:
        raise ValueError(
            f"{path!r} is a safetensors file without sparsenet metadata; it was not written by "
            f"sparsenet.save (plain state_dicts load with safetensors.torch.load_file)"
        )
    try:
        header = json.loads(raw[_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r}: the sparsenet metadata is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != _MAGIC:
        raise ValueError(f"{path!r}: the 'sparsenet' metadata entry is not sparsenet's")
    version = header.get("file_format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path!r}: invalid file_format_version {version!r}")
    if version > FILE_FORMAT_VERSION:
        raise ValueError(
            f"{path!r} uses file format {version}, written by sparsenet {header.get('sparsenet_version')}; "
            f"this sparsenet ({_sparsenet_version()}) reads up to {FILE_FORMAT_VERSION}: upgrade sparsenet"
        )
    expected = {"modules": list, "aliases": dict, "dtype_views": dict, "crc32": dict}
    for key, kind in expected.items():
        if not isinstance(header.get(key), kind):
            raise ValueError(f"{path!r}: the sparsenet metadata lacks a valid {key!r} entry")
    for entry in header["modules"]:
        _check_module_entry(path, entry)
    return header


def _check_module_entry(path: str, entry) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{path!r}: malformed sparse module entry {entry!r}")
    name, fmt, version = entry["name"], entry.get("format"), entry.get("version")
    if fmt != PackedCSR.FORMAT:
        raise ValueError(f"{path!r}: module {name!r} uses format {fmt!r}, which this sparsenet cannot read")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path!r}: module {name!r} has invalid format version {version!r}")
    if version > PackedCSR.VERSION:
        raise ValueError(
            f"{path!r}: module {name!r} uses {fmt} format version {version}; this sparsenet reads up to "
            f"{PackedCSR.VERSION}: upgrade sparsenet"
        )


def read_metadata(path: str | os.PathLike) -> dict:
    """The sparsenet metadata of a saved file (validated header; tensors are not read)."""
    header, _ = _read(path, with_tensors=False)
    return header


def _restore_tensors(path: str, header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checksums, original dtypes and aliases: the state_dict exactly as it was saved."""
    for name, t in tensors.items():
        if _checksum(t) != header["crc32"][name]:
            raise ValueError(f"{path!r}: tensor {name!r} fails its checksum; the file is corrupted")
    state = dict(tensors)
    for name, dtype_name in header["dtype_views"].items():
        dtype = _DTYPE_BY_NAME.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None or name not in state or state[name].dtype != _STORED_AS[dtype]:
            raise ValueError(f"{path!r}: invalid dtype view {name!r} -> {dtype_name!r}")
        state[name] = state[name].view(dtype)
    for alias, target in header["aliases"].items():
        if not isinstance(target, str) or alias in tensors or target not in tensors:
            raise ValueError(f"{path!r}: invalid alias {alias!r} -> {target!r}")
        state[alias] = state[target]
    return state


def _names_preview(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _check_against_model(path: str, header: dict, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    skeleton = model.state_dict()
    missing, unexpected = skeleton.keys() - state.keys(), state.keys() - skeleton.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_names_preview(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_names_preview(unexpected)}")
        raise ValueError(f"{path!r} does not match the model's tensors ({'; '.join(parts)})")

    sparse = _sparse_modules(model)
    entries = {e["name"]: e for e in header["modules"]}
    if entries.keys() != sparse.keys():
        raise ValueError(
            f"{path!r}: the file's sparse modules ({_names_preview(entries) or 'none'}) differ from the "
            f"model's ({_names_preview(sparse) or 'none'})"
        )
    resizable = set()  # a sparse layer may hold a different number of non-zeros than the skeleton
    for name, m in sparse.items():
        p = _prefix(name)
        shape = (m.out_features, m.in_features)
        try:
            packed = PackedCSR(state[p + "crow_indices"], state[p + "col_indices"], state[p + "values"], shape)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path!r}: sparse module {name!r} ({shape[0]}x{shape[1]}) is invalid: {e}") from None
        described = {k: entries[name].get(k) for k in ("shape", "nnz", "index_dtype")}
        actual = {k: packed.metadata()[k] for k in described}
        if described != actual:
            raise ValueError(f"{path!r}: module {name!r} is described as {described} but holds {actual}")
        resizable.update((p + "col_indices", p + "values"))

    for key, want in skeleton.items():
        got = state[key]
        if key not in resizable and got.shape != want.shape:
            raise ValueError(f"{path!r}: {key!r} has shape {tuple(got.shape)}, the model expects {tuple(want.shape)}")
        # Floating tensors may change precision on load (as with load_state_dict); other dtypes must match.
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise ValueError(f"{path!r}: {key!r} is {got.dtype}, the model expects {want.dtype}")


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by ``save`` into ``model`` (a skeleton of the same architecture) and return it.

    Sparse layers may hold a different number of non-zeros than the skeleton's. Everything is
    validated before the first tensor is copied: any problem raises ValueError and leaves ``model``
    unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    header, tensors = _read(path, with_tensors=True)
    state = _restore_tensors(path, header, tensors)
    _check_against_model(path, header, state, model)
    model.load_state_dict(state, strict=True)
    return model


__all__ = ["save", "load", "read_metadata", "size_report", "SizeReport", "FILE_FORMAT_VERSION"]
