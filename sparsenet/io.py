"""Save and load sparse models as safetensors files: no pickle, validated before anything is loaded.

A file holds the model's whole ``state_dict`` (sparse layers as their packed CSR tensors, everything
else as is) plus one JSON document under the key ``"sparsenet"`` of the safetensors header metadata::

    {"format": "sparsenet", "file_format_version": 1, "sparsenet_version": "0.1.0",
     "modules": [{"name": "fc1", "type": "SparseLinear", "format": "csr", "version": 1,
                  "shape": [out, in], "nnz": 1234, "index_dtype": "uint16"}, ...],
     "aliases": {"head.weight": "embed.weight"},   # tied tensors, stored once
     "dtype_views": {"fc1.col_indices": "uint16"},  # stored bit-for-bit as int16
     "crc32": {"fc1.values": 123456789, ...},        # per stored tensor
     "sizes": {"fc1": {"in_features": 128, "out_features": 96}, "norm": {"normalized_shape": [96]}, ...},
     "stored_bytes": ..., "dense_bytes": ...}

Design choices, and why:

* Tied tensors (several names, one tensor) are stored once and listed in ``aliases``; on load every
  name gets the data again, so a tied skeleton stays tied and an untied one gets equal copies. A file
  holding different data under two names of one skeleton tensor (tied weights, a module registered
  twice) is refused: loading it would keep whichever name came last. Tensors that merely overlap in
  memory without being the same view are saved as copies.
* Unsigned index dtypes are stored reinterpreted as the signed dtype of the same width, because only
  recent safetensors releases know ``torch.uint16``; the bits are unchanged.
* safetensors has no checksums, and a flipped byte in a weight would load silently, so each tensor's
  CRC-32 is recorded and checked.
* ``load`` checks the whole file against the skeleton (names, shapes, dtypes, packed-CSR invariants,
  checksums, versions) before it copies a single tensor, so a bad file raises ValueError and leaves
  the skeleton untouched. Names are checked from the header, before any tensor is read.
* The skeleton may be the plain dense model (built from its config): a layer the file records as
  sparse where the model has an ``nn.Linear`` or Hugging Face ``Conv1D`` of that shape gets a
  SparseLinear in its place. The checks run against a stand-in of the converted model that shares
  every tensor with the skeleton, so nothing is swapped until the whole file has passed them.
* ``sizes`` records, under every name, the size attributes (``in_features``, ``out_channels``,
  ``groups``, ``normalized_shape``, ...) of each module that has any, so that a model narrowed by
  ``sparsenet.shrink`` loads into the plain model built from its original config: a Linear,
  Conv1D, Conv2d, BatchNorm, LayerNorm or Embedding the file records narrower is resized first
  (in the stand-in for the checks, then in place). Files without the entry (written before it
  existed) load as they always did.
"""
from __future__ import annotations

import json
import os
import stat
import uuid
import zlib
from dataclasses import dataclass
from typing import Collection, Optional

import torch
from torch import nn

from sparsenet._hf_config import ffn_layers, sync_config
from sparsenet._sizes import fix_head_counts, fix_sizes, module_sizes, shapes_at
from sparsenet._version import __version__
from sparsenet._weights import is_conv1d
from sparsenet.formats import registry

FILE_FORMAT_VERSION = 1
_METADATA_KEY = "sparsenet"
_MAGIC = "sparsenet"
# Unsigned dtypes older safetensors releases cannot write, and the same-width dtype stored instead.
_STORED_AS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_DTYPE_BY_NAME = {str(d).removeprefix("torch."): d for d in _STORED_AS}


# ---- helpers shared by save and load ---------------------------------------------------------------

def _sparse_names(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """Each sparse layer (SparseLinear, SparseConv2d) with every name it has, keyed by its first: a
    module registered twice (``self.a = self.b = layer``) appears in ``state_dict`` under both prefixes."""
    from sparsenet.nn.convert import all_module_names
    from sparsenet.nn.linear import SparseWeightModule

    names = all_module_names(model)
    return {names[id(m)][0]: (m, names[id(m)]) for m in model.modules() if isinstance(m, SparseWeightModule)}


def _conv_entry(conv: nn.Module) -> dict:
    """What a file records of a SparseConv2d besides its packed weight: its geometry."""
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride), "padding": list(conv.padding), "dilation": list(conv.dilation),
            "groups": conv.groups}


def _sparse_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Each sparse layer once, under its first name (as ``named_modules()`` lists it)."""
    return {first: m for first, (m, _) in _sparse_names(model).items()}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _recorded_sizes(module: nn.Module) -> dict:
    """The module's size attributes as the file records them (JSON: ``normalized_shape`` as a
    list). A value that is no size (a custom module's ``groups`` may be anything) is left out."""
    sizes = {}
    for attr, value in module_sizes(module).items():
        if isinstance(value, (tuple, list)) and all(_is_size(v) for v in value):
            sizes[attr] = list(value)
        elif _is_size(value):
            sizes[attr] = value
    return sizes


def _checksum(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(raw.numpy()) if raw.numel() else 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sparsenet_version() -> str:
    return __version__


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
        entry = {"name": name, "type": type(m).__name__, **packed.metadata()}
        if entry["type"] == "SparseConv2d":
            entry["conv"] = _conv_entry(m)
        entries.append(entry)
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
        names = (*registry.get(m.format).STRUCTURE, "values")  # what the layer stores instead of its weight
        dense_bytes -= sum(_nbytes(stored[p + k]) for k in names if p + k in stored)
        dense_bytes += m.packed_shape[0] * m.packed_shape[1] * 4
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


_NOT_A_FILE = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def output_target(path: str | os.PathLike) -> str:
    """The file ``save`` will replace for ``path``: its absolute path, symlinks resolved.

    ``save`` renames a finished temporary file onto this path, which would replace whatever is
    there: a symlink is written through (the link stays, its target gets the file), and anything
    that exists but is not a regular file (a directory, FIFO, device node such as /dev/null,
    socket) is refused with ValueError before a byte is written.
    """
    target = os.path.realpath(os.fspath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    for is_kind, kind in _NOT_A_FILE:
        if is_kind(mode):
            raise ValueError(f"cannot save to {os.fspath(path)!r}: it is {kind}, not a regular file; "
                             "pass a file path")
    return target


def save(model: nn.Module, path: str | os.PathLike) -> SizeReport:
    """Write ``model.state_dict()`` and sparsenet's metadata to a safetensors file at ``path``.

    The file is written next to ``path`` and renamed into place, so a failed save never leaves a
    truncated file behind. ``path`` must be a regular file or not exist (see :func:`output_target`;
    a symlink is written through). Returns the sizes (stored vs dense) of what was written.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = output_target(path)  # a directory or device is refused before the work, not after it
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
        # Every name of a module: the model loaded into may not share what the saved one shared.
        "sizes": {name: sizes for name, m in model.named_modules(remove_duplicate=False)
                  if (sizes := _recorded_sizes(m))},
        "stored_bytes": report.stored_bytes,
        "dense_bytes": report.dense_bytes,
    }
    # A unique name in the same directory: os.replace is atomic only within one filesystem.
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(stored, tmp, metadata={_METADATA_KEY: json.dumps(header)})
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return report


# ---- load ----------------------------------------------------------------------------------------

def _read(path: str | os.PathLike, expected: Optional[Collection[str]] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The parsed sparsenet header and, when ``expected`` (the skeleton's state_dict keys) is given,
    the stored tensors; ValueError for a bad file.

    Tensors are read only once the header, the aliases and the names the file provides have been
    checked against ``expected``: a file with a stray (possibly huge) tensor is refused unread.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"cannot load {path!r}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata()
            names = list(f.keys())
            header = _parse_header(path, raw)  # before reading any tensor: cheap refusals first
            if set(header["crc32"]) != set(names):
                raise ValueError(f"{path!r}: the checksums do not list the stored tensors; the file was altered")
            _check_aliases(path, header["aliases"], names)
            if expected is None:
                return header, {}
            _check_names(path, set(names) | header["aliases"].keys(), expected)
            return header, {n: f.get_tensor(n) for n in names}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own error type differs across releases; OSError too
        raise ValueError(f"cannot load {path!r}: not a readable safetensors file ({e})") from e


def _check_aliases(path: str, aliases: dict, stored: Collection[str]) -> None:
    for alias, target in aliases.items():
        if not isinstance(target, str) or alias in stored or target not in stored:
            raise ValueError(f"{path!r}: invalid alias {alias!r} -> {target!r}")


def _names_preview(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _check_names(path: str, provided: Collection[str], expected: Collection[str]) -> None:
    missing, unexpected = set(expected) - set(provided), set(provided) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_names_preview(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_names_preview(unexpected)}")
        raise ValueError(f"{path!r} does not match the model's tensors ({'; '.join(parts)})")


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
    _check_sizes_entry(path, header.get("sizes", {}))  # absent from files written before it existed
    return header


def _check_sizes_entry(path: str, sizes) -> None:
    if not isinstance(sizes, dict):
        raise ValueError(f"{path!r}: the sparsenet metadata lacks a valid 'sizes' entry")
    for name, record in sizes.items():
        valid = isinstance(record, dict) and all(
            isinstance(attr, str) and (_is_size(v) or isinstance(v, list) and all(_is_size(x) for x in v))
            for attr, v in record.items())
        if not valid:
            raise ValueError(f"{path!r}: malformed sizes entry for module {name!r}: {record!r}")


def _check_module_entry(path: str, entry) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{path!r}: malformed sparse module entry {entry!r}")
    name, fmt, version = entry["name"], entry.get("format"), entry.get("version")
    kind = entry.get("type", "SparseLinear")
    if kind not in ("SparseLinear", "SparseConv2d"):
        raise ValueError(f"{path!r}: module {name!r} is a {kind!r}, which this sparsenet cannot read")
    if kind == "SparseConv2d":
        conv = entry.get("conv")
        pairs = ("kernel_size", "stride", "padding", "dilation")
        valid = isinstance(conv, dict) and all(_is_size(conv.get(k)) for k in ("in_channels", "out_channels", "groups")) \
            and all(isinstance(conv.get(k), list) and len(conv[k]) == 2 and all(_is_size(v) for v in conv[k])
                    for k in pairs)
        if not valid:
            raise ValueError(f"{path!r}: sparse convolution {name!r} has no valid geometry: {conv!r}")
    if fmt not in registry.names():
        raise ValueError(f"{path!r}: module {name!r} uses format {fmt!r}, which this sparsenet cannot read "
                         f"(it reads {', '.join(registry.names())})")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path!r}: module {name!r} has invalid format version {version!r}")
    if version > registry.get(fmt).VERSION:
        raise ValueError(
            f"{path!r}: module {name!r} uses {fmt} format version {version}; this sparsenet reads up to "
            f"{registry.get(fmt).VERSION}: upgrade sparsenet"
        )


def read_metadata(path: str | os.PathLike) -> dict:
    """The sparsenet metadata of a saved file (validated header; tensors are not read)."""
    header, _ = _read(path)
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
    for alias, target in header["aliases"].items():  # checked by _read
        state[alias] = state[target]
    return state


def _descriptions(path: str, header: dict, sparse: dict[str, tuple[nn.Module, list[str]]]) -> dict[str, dict]:
    """The file's entry for each sparse module (keyed by its first name); ``save`` lists a shared
    module once, under whichever of its names the saved model reached first."""
    entries = {e["name"]: e for e in header["modules"]}
    found = {}
    for first, (_, names) in sparse.items():
        hits = [n for n in names if n in entries]
        if len(hits) == 1:
            found[first] = entries[hits[0]]
    if len(found) != len(sparse) or len(entries) != len(sparse):
        raise ValueError(
            f"{path!r}: the file's sparse modules ({_names_preview(entries) or 'none'}) differ from the "
            f"model's ({_names_preview(sparse) or 'none'})"
        )
    return found


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bytes, not torch.equal: NaN equals itself here, and uint16 needs no arithmetic support.
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _check_shared(path: str, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """One tensor of the model under several names (a shared module, tied weights) takes one value:
    a file holding different data under those names would load whichever name came last."""
    names: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(key)
    for keys in names.values():
        for other in keys[1:]:
            if not _same_bits(state[keys[0]], state[other]):
                raise ValueError(
                    f"{path!r}: {keys[0]!r} and {other!r} are one tensor in the model, but the file "
                    "holds different data under the two names"
                )


def _check_against_model(path: str, header: dict, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    skeleton = model.state_dict()
    sparse = _sparse_names(model)
    entries = _descriptions(path, header, sparse)
    resizable = set()  # a sparse layer may hold a different number of non-zeros than the skeleton
    for first, (m, names) in sparse.items():
        shape = m.packed_shape
        spec = registry.get(m.format)
        for name in names:  # each name's tensors are validated: load_state_dict copies them all
            p = _prefix(name)
            tensors = {n: state[p + n] for n in (*spec.STRUCTURE, "values")}
            try:
                packed = spec.from_tensors(registry.packable(tensors), shape)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path!r}: sparse module {name!r} ({shape[0]}x{shape[1]}) is invalid: {e}") from None
            described = {k: entries[first].get(k) for k in packed.metadata() if k not in ("format", "version")}
            actual = {k: packed.metadata()[k] for k in described}
            if described != actual:
                raise ValueError(f"{path!r}: module {name!r} is described as {described} but holds {actual}")
            resizable.update(p + n for n in tensors)

    for key, want in skeleton.items():
        got = state[key]
        if key not in resizable and got.shape != want.shape:
            raise ValueError(f"{path!r}: {key!r} has shape {tuple(got.shape)}, the model expects {tuple(want.shape)}")
        # Floating tensors may change precision on load (as with load_state_dict); other dtypes must match.
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise ValueError(f"{path!r}: {key!r} is {got.dtype}, the model expects {want.dtype}")
    _check_shared(path, state, model)


def _module_at(path: str, model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path!r} holds a sparse layer {name!r}, but the model has no module {name!r}: "
                         "pass a model of the architecture the file was saved from") from None


def _sparse_shell(path: str, entry: dict, layer: nn.Module, has_bias: bool) -> nn.Module:
    """An empty sparse layer of the file's kind and format to load its sparse layer ``entry`` into, in
    place of the model's ``layer`` (dense, or sparse in another format); ValueError when ``layer``
    cannot be that layer."""
    from sparsenet._weights import is_linear, linear_features
    from sparsenet.nn import SparseConv2d, SparseLinear
    from sparsenet.nn.conv import conv_padding

    name, kind = entry["name"], type(layer).__name__
    if has_bias != (getattr(layer, "bias", None) is not None):
        raise ValueError(f"{path!r}: sparse layer {name!r} has {'a' if has_bias else 'no'} bias in the file, "
                         f"but the model's {kind} {name!r} has {'none' if has_bias else 'one'}")
    if entry.get("type") == "SparseConv2d":
        if not isinstance(layer, (nn.Conv2d, SparseConv2d)):
            raise ValueError(f"{path!r} holds {name!r} as a sparse convolution, but the model's {name!r} is a {kind}: "
                             "it must be an nn.Conv2d or a SparseConv2d")
        geometry = entry["conv"]
        try:  # padding="same" / "valid" as numbers; another padding_mode cannot be this layer
            padding = list(layer.padding if isinstance(layer, SparseConv2d) else conv_padding(layer))
        except ValueError as e:
            raise ValueError(f"{path!r}: the model's {name!r} cannot hold the file's sparse convolution: {e}") from None
        own = {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
               "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "padding": padding,
               "dilation": list(layer.dilation), "groups": layer.groups}
        if any(geometry.get(k) != v for k, v in own.items()):
            raise ValueError(f"{path!r}: sparse convolution {name!r} is {geometry} in the file, but the model's "
                             f"{kind} {name!r} is {own}")
        return SparseConv2d(bias=has_bias, **geometry)
    if isinstance(layer, SparseLinear):
        out_features, in_features = layer.out_features, layer.in_features
    elif is_linear(layer):
        out_features, in_features = linear_features(layer)
    else:
        raise ValueError(f"{path!r} holds {name!r} as a sparse layer, but the model's {name!r} is a {kind}: "
                         "it must be an nn.Linear, a transformers Conv1D or a SparseLinear")
    if entry.get("shape") != [out_features, in_features]:
        raise ValueError(f"{path!r}: sparse layer {name!r} has shape {entry.get('shape')} (out, in) in the file, "
                         f"but the model's {kind} {name!r} is [{out_features}, {in_features}]")
    return SparseLinear(in_features, out_features, bias=has_bias, format=entry["format"])


def _sparse_swaps(path: str, header: dict, model: nn.Module) -> dict[str, nn.Module]:
    """name -> new sparse layer, for each dense layer of ``model`` that the file holds as sparse (a
    layer registered under several names gets one sparse layer under all of them, as in sparsify)."""
    from sparsenet.nn import SparseConv2d, SparseLinear
    from sparsenet.nn.convert import all_module_names

    provided = header["crc32"].keys() | header["aliases"].keys()
    shells: dict[int, nn.Module] = {}
    for entry in header["modules"]:
        layer = _module_at(path, model, entry["name"])
        # a dense layer, or a sparse one of another format (format="auto" chooses per machine)
        kind = SparseConv2d if entry.get("type") == "SparseConv2d" else SparseLinear
        swap = not isinstance(layer, kind) or layer.format != entry["format"]
        if swap and id(layer) not in shells:
            has_bias = _prefix(entry["name"]) + "bias" in provided
            shells[id(layer)] = _sparse_shell(path, entry, layer, has_bias)
    names = all_module_names(model) if shells else {}
    return {alias: shell for key, shell in shells.items() for alias in names[key]}


def _resize_swaps(path: str, header: dict, model: nn.Module) -> dict[str, nn.Module]:
    """name -> the model's module resized to the file's recorded sizes (see :func:`_resized`), under
    every name it has, for each module whose recorded sizes differ from its own. A record of other
    attributes than the module's (another kind of module) is left to the later checks, which name
    the layer or tensor that does not fit."""
    from sparsenet.nn.convert import all_module_names

    wanted: dict[int, tuple[str, nn.Module, dict]] = {}
    for name, sizes in header.get("sizes", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a module the model lacks: its tensors, if it has any, are refused by name
        sizes = _in_own_terms(module, sizes)
        if sizes.keys() != _recorded_sizes(module).keys():
            continue  # another kind of module: the checks of its sparse layer or its tensors say so
        first, _, earlier = wanted.setdefault(id(module), (name, module, sizes))
        if earlier != sizes:
            raise ValueError(f"{path!r}: {first!r} and {name!r} are one module in the model, but the file "
                             f"records different sizes for them ({_described(earlier)}; {_described(sizes)})")
    replacements: dict[int, torch.Tensor] = {}
    twins = {key: _resized(path, name, module, sizes, replacements)
             for key, (name, module, sizes) in wanted.items() if sizes != _recorded_sizes(module)}
    names = all_module_names(model) if twins else {}
    return {alias: twin for key, twin in twins.items() for alias in names[key]}


def _in_own_terms(module: nn.Module, sizes: dict) -> dict:
    """Sizes recorded for a SparseLinear, in the terms of the transformers Conv1D that the plain
    model has in its place (``nf`` outputs, ``nx`` inputs); other records already are in the
    module's terms."""
    if not is_conv1d(module) or sizes.keys() != {"in_features", "out_features"}:
        return sizes
    own = {"nf": sizes["out_features"], "nx": sizes["in_features"]}
    return {attr: own[attr] for attr in _recorded_sizes(module)}  # older transformers have no nx


def _described(sizes: dict) -> str:
    return ", ".join(f"{attr}={value}" for attr, value in sizes.items())


def _resized(path: str, name: str, module: nn.Module, sizes: dict, replacements: dict[int, torch.Tensor]) -> nn.Module:
    """A twin of ``module`` (its own attributes, not a copy of its tensors) at the recorded ``sizes``:
    each tensor whose shape changes is a new tensor of the same dtype, device and
    requires_grad (a Parameter stays one), and the size attributes are read back from the tensors
    as ``shrink`` sets them. ``replacements`` (id of an old tensor -> its new one) keeps tied
    tensors tied. ValueError where the module cannot be resized to ``sizes``."""
    from torch.nn.utils import parametrize

    kind, own = type(module).__name__, _recorded_sizes(module)
    mismatch = (f"{path!r}: {name!r} is {_described(sizes)} in the file, but the model's {kind} {name!r} is "
                f"{_described(own)}")
    if parametrize.is_parametrized(module):
        raise ValueError(f"{mismatch}, and a parametrized module is not resized: load into the plain model")
    if not _narrower(sizes, own):
        raise ValueError(f"{mismatch}: a file loads into the model it was saved from, or into the plain model "
                         "built from the config it was shrunk from, which is never narrower")
    shapes = shapes_at(module, sizes)
    if shapes is None:
        raise ValueError(f"{mismatch}; only Linear, Conv1D, Conv2d, BatchNorm, LayerNorm, Embedding and "
                         "MultiheadAttention layers are resized to a file's sizes: pass a model of the "
                         "architecture the file was saved from")
    twin = _shallow_copy(module)
    for store in ("_parameters", "_buffers"):
        tensors = vars(twin)[store] = dict(vars(module)[store])
        for attr, old in tensors.items():
            if old is None or attr not in shapes or tuple(old.shape) == shapes[attr]:
                continue
            new = replacements.setdefault(id(old), _blank(old, shapes[attr]))
            if tuple(new.shape) != shapes[attr]:
                raise ValueError(f"{path!r}: {name}.{attr} is tied to a tensor that the file records at another size")
            tensors[attr] = new
    fix_sizes(twin)
    if _recorded_sizes(twin) != sizes:  # e.g. a plain conv given other groups, or channels groups do not divide
        raise ValueError(f"{path!r}: the file records {name!r} as {_described(sizes)}, which a {kind} like the "
                         f"model's cannot be: the file is inconsistent")
    return twin


def _narrower(sizes: dict, own: dict) -> bool:
    """Every recorded size between 1 and the model's: shrinking narrows, never widens or empties."""
    def flat(value):
        return value if isinstance(value, list) else [value]

    pairs = [(flat(sizes[attr]), flat(own[attr])) for attr in own]
    return all(len(new) == len(old) and all(1 <= n <= o for n, o in zip(new, old)) for new, old in pairs)


def _blank(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # Uninitialised (no second pass over a large model's memory): only weight, bias and running
    # statistics are resized, all in the file, and load_state_dict writes every one of them.
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object holding ``module``'s attributes (its registries are the same dicts)."""
    # Not copy.copy: parametrized modules refuse to be copied that way.
    twin = type(module).__new__(type(module))
    vars(twin).update(vars(module))
    return twin


def _stand_in(model: nn.Module, swaps: dict[str, nn.Module]) -> nn.Module:
    """``model`` as it will be once ``swaps`` are made, built without changing it: each module on the
    way to a swapped one is a shallow copy with a registry of children of its own; every other
    module, and every parameter and buffer, is ``model``'s own. Only ``state_dict`` and the module
    tree of the result are used (to check the file), never its forward."""
    if "" in swaps:  # the model is itself the layer
        return swaps[""]
    copies: dict[int, nn.Module] = {}

    def copy_of(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            twin = _shallow_copy(module)
            vars(twin)["_modules"] = dict(module._modules)
            copies[id(module)] = copies[id(twin)] = twin  # a module reached twice is copied once
        return copies[id(module)]

    root = copy_of(model)
    for name, new in swaps.items():
        *path, last = name.split(".")
        parent = root
        for part in path:
            child = copy_of(parent._modules[part])
            parent._modules[part] = child
            parent = child
        parent._modules[last] = new
    return root


def _apply_swaps(model: nn.Module, swaps: dict[str, nn.Module]) -> nn.Module:
    from sparsenet.nn.convert import _set_submodule

    if "" in swaps:
        return swaps[""]
    for name, new in swaps.items():
        _set_submodule(model, name, new)
    return model


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by ``save`` into ``model`` and return it.

    ``model`` is a model of the saved architecture: the plain dense one (e.g. ``BertModel(config)``)
    or one whose sparse layers already are SparseLinear. Each layer the file holds as sparse where
    ``model`` has an ``nn.Linear`` or a Hugging Face ``Conv1D`` of the same shape and bias is replaced
    by a SparseLinear (under every name it is registered by); the result is ``model`` itself, or a
    new SparseLinear when ``model`` is itself such a layer. Sparse layers may hold a different number
    of non-zeros than the skeleton's. A model narrowed by ``sparsenet.shrink`` loads into the plain
    model built from its original config: each Linear, Conv1D, Conv2d (a depthwise one's ``groups``
    too), BatchNorm, LayerNorm or Embedding that the file records narrower is resized in place
    first (new tensors, tied ones still tied, Parameters still Parameters; size attributes as in
    the file); any other module whose sizes differ, or one recorded wider, is refused.

    Everything is validated before anything changes: any problem raises ValueError and leaves
    ``model`` as it was, with no layer replaced and no tensor copied. A Hugging Face model that ends
    up holding SparseLinear layers has its ``save_pretrained`` refused (see
    ``sparsenet.nn.hf.guard_save_pretrained``): ``from_pretrained`` could not read them back.
    """
    from sparsenet.nn.hf import guard_save_pretrained

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    # The header says which modules are resized and which dense layers (as resized) become
    # SparseLinear; the file is then read and checked in full against that model (should the file
    # change in between, those checks catch it).
    header = read_metadata(path)
    resizes = _resize_swaps(path, header, model)
    swaps = _sparse_swaps(path, header, _stand_in(model, resizes) if resizes else model)
    target = _stand_in(model, {**resizes, **swaps}) if resizes or swaps else model
    header, tensors = _read(path, expected=target.state_dict().keys())
    state = _restore_tensors(path, header, tensors)
    _check_against_model(path, header, state, target)
    ffn = ffn_layers(model) if resizes else {}
    for name, twin in resizes.items():  # in place: the model's modules stay the objects they are
        module = model.get_submodule(name)
        vars(module).update(vars(twin))
        module.__class__ = type(twin)  # an attention module that lost heads gets the forward for it
    model = _apply_swaps(model, swaps)
    if resizes:
        for module in model.modules():  # attention modules whose projections lost heads
            fix_head_counts(module)
        sync_config(model, ffn)  # a Hugging Face config that can describe the file's sizes does
    model.load_state_dict(state, strict=True)
    return guard_save_pretrained(model)


def load_dense(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Like :func:`load`, but the model keeps its own dense layers: each sparse layer's weights are
    written into the model's ``nn.Linear`` / ``Conv1D`` (zeros included) instead of a SparseLinear
    taking its place. For fine-tuning or re-pruning a saved sparse model as a dense one."""
    from sparsenet._weights import from_matrix, is_linear
    from sparsenet.nn import SparseLinear
    from sparsenet.nn.convert import _set_submodule, all_module_names

    names = all_module_names(model)
    dense_layers = {name: m for m in model.modules() if is_linear(m) for name in names[id(m)]}
    loaded = load(path, model)  # validated in full before anything changes
    for name, sparse in list(loaded.named_modules(remove_duplicate=False)):
        layer = dense_layers.get(name)
        if not isinstance(sparse, SparseLinear) or layer is None:
            continue
        with torch.no_grad():
            layer.weight.copy_(from_matrix(layer, sparse.to_dense()))
            if layer.bias is not None:
                layer.bias.copy_(sparse.bias)
        if name:
            _set_submodule(loaded, name, layer)
        else:
            loaded = layer
    return loaded


__all__ = ["save", "load", "load_dense", "read_metadata", "size_report", "SizeReport", "FILE_FORMAT_VERSION"]
