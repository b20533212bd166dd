"""Which GPU architectures a compiled CUDA module carries code for, read from its ``.nv_fatbin``
section: what ``cuobjdump --list-elf --list-ptx`` reports, for machines without the CUDA binary
utilities (CI here has nvcc but no cuobjdump).

A fat binary is a 16-byte header (magic 0xBA55ED50, version, header size, payload size) followed by
entries, each with a header of its own: kind (1: PTX, 2: an ELF cubin) at byte 0, header size at 4,
payload size at 8, the SM number at 28 and, at 40, flags in which 0x100000 marks an architecture-
specific ("a") target such as sm_90a. A linked module holds one fat binary per CUDA source file.
The layout was read off nvcc 13's output and is pinned by a test that compiles known targets.
"""
from __future__ import annotations

import struct

_MAGIC = 0xBA55ED50
_KIND = {1: "compute", 2: "sm"}
_ARCH_SPECIFIC = 0x100000


def _section(data: bytes, name: bytes) -> bytes:
    """The contents of the named section of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)  # name, type, flags, addr, offset, size
    names_at = header(shstrndx)[4]
    for i in range(shnum):
        name_off, _, _, _, offset, size = header(i)
        end = data.index(b"\0", names_at + name_off)
        if data[names_at + name_off:end] == name:
            return data[offset:offset + size]
    return b""


def architectures(path: str) -> set[str]:
    """``{"sm_80", "sm_90a", "compute_90", ...}``: the cubins (sm_) and PTX (compute_) in the module.
    ValueError for a file that is not a readable ELF64 (truncated, or something else)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _architectures(_section(data, b".nv_fatbin"))
    except (struct.error, ValueError) as e:
        raise ValueError(f"{path}: not a readable little-endian ELF64 file ({e})") from None


def _architectures(blob: bytes) -> set[str]:
    found, at = set(), 0
    while at + 16 <= len(blob):
        magic, _version, header_size, payload = struct.unpack_from("<IHHQ", blob, at)
        if magic != _MAGIC or header_size == 0:  # fat binaries are 8-byte aligned within the section
            at += 8
            continue
        entry, end = at + header_size, at + header_size + payload
        while entry + 44 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", blob, entry)
            sm, = struct.unpack_from("<I", blob, entry + 28)
            flags, = struct.unpack_from("<I", blob, entry + 40)
            if kind in _KIND:
                found.add(f"{_KIND[kind]}_{sm}{'a' if flags & _ARCH_SPECIFIC else ''}")
            if entry_header == 0:  # a corrupt entry: nothing past it can be located
                break
            entry += entry_header + entry_size
        at = end
    return found
