"""The on-disk format of one saved sequence state, and its atomic write.

A file is a fixed header, the token ids whose KV the state holds, then llama.cpp's
sequence-state blob:

    magic "LMSKVST\\0" | version u16 | reserved u16 | compat key 32B | adapters key 32B |
    n_tokens u32 | blob_len u64 | blob crc32 | header crc32 (fields before it + tokens)
    tokens: n_tokens x int32 | blob: blob_len bytes

Start-up indexing reads only the header and the tokens. The blob's checksum is checked
when the state is loaded, so a damaged file is never handed to llama.cpp.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
import time
import zlib
from array import array
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger("lmserve.disk_cache")

MAGIC = b"LMSKVST\x00"
VERSION = 1
SUFFIX = ".lmkv"
_HEAD = struct.Struct("<8sHH32s32sIQI")  # everything before the header crc
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size
_LITTLE_ENDIAN = sys.byteorder == "little"
_STALE_TEMP_SECONDS = 600.0


class CorruptStateFile(ValueError):
    """The file is damaged (truncated, bad checksum, not a state file at all)."""


class IncompatibleStateFile(ValueError):
    """A valid file from another format version."""


@dataclass(eq=False)
class Entry:
    """One indexed state file."""

    path: str
    tokens: list[int]
    adapters: bytes
    size: int
    last_used: float  # wall time (the file's mtime after a restart)
    failures: int = 0  # loads llama.cpp refused (no contiguous room, or a foreign state)


@dataclass(frozen=True)
class StateHeader:
    compat: bytes
    adapters: bytes
    tokens: list[int]
    blob_len: int
    blob_crc: int

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + 4 * len(self.tokens) + self.blob_len


def _pack_tokens(tokens: list[int]) -> bytes:
    arr = array("i", tokens)
    if not _LITTLE_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def _unpack_tokens(body: bytes) -> list[int]:
    arr = array("i")
    arr.frombytes(body)
    if not _LITTLE_ENDIAN:
        arr.byteswap()
    return arr.tolist()


def encode_header(compat: bytes, adapters: bytes, tokens: list[int], blob: bytes | bytearray
                  ) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, compat, adapters, len(tokens), len(blob),
                      zlib.crc32(blob))
    body = _pack_tokens(tokens)
    return head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body


def read_header(f: BinaryIO, file_size: int) -> StateHeader:
    """Parse and check the header and tokens; the blob is not read."""
    raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise CorruptStateFile("shorter than a header")
    head = raw[:_HEAD.size]
    magic, version, _r, compat, adapters, n_tokens, blob_len, blob_crc = _HEAD.unpack(head)
    if magic != MAGIC:
        raise CorruptStateFile("not a sequence-state file")
    if version != VERSION:
        raise IncompatibleStateFile(f"format version {version}, this build reads {VERSION}")
    (header_crc,) = _CRC.unpack(raw[_HEAD.size:])
    if HEADER_SIZE + 4 * n_tokens + blob_len != file_size:
        raise CorruptStateFile("the size does not match the header (truncated?)")
    body = f.read(4 * n_tokens)
    if zlib.crc32(body, zlib.crc32(head)) != header_crc:
        raise CorruptStateFile("header checksum mismatch")
    return StateHeader(compat, adapters, _unpack_tokens(body), blob_len, blob_crc)


def read_state(path: str) -> tuple[StateHeader, bytearray]:
    """The header and the checked blob (a bytearray, so llama.cpp can read it in place)."""
    with open(path, "rb") as f:
        header = read_header(f, os.fstat(f.fileno()).st_size)
        blob = bytearray(header.blob_len)
        if f.readinto(blob) != header.blob_len:
            raise CorruptStateFile("the state blob is truncated")
    if zlib.crc32(blob) != header.blob_crc:
        raise CorruptStateFile("state checksum mismatch")
    return header, blob


def write_atomic(path: str, header: bytes, blob: bytes | bytearray) -> None:
    """Write to a temporary file, fsync, then rename over `path`: readers see all or nothing."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp") and SUFFIX in name


# -- keys ---------------------------------------------------------------------------------
def compat_key(model_path: str, state_format: str) -> bytes:
    """Model file identity (path, size, mtime) and the state format of this build/context."""
    st = os.stat(model_path)
    ident = f"{os.path.realpath(model_path)}|{st.st_size}|{st.st_mtime_ns}|{state_format}"
    return hashlib.sha256(ident.encode()).digest()


def adapters_key(adapters: tuple[tuple[str, float], ...]) -> bytes:
    """The LoRA set, by file identity and scale (b"" hashes to the base model's key)."""
    parts = []
    for path, scale in adapters:
        try:
            st = os.stat(path)
            parts.append(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{scale!r}")
        except OSError:
            parts.append(f"{path}|{scale!r}")
    return hashlib.sha256("\n".join(parts).encode()).digest()


# -- start-up index -----------------------------------------------------------------------
def scan_directory(directory: str, compat: bytes) -> list[Entry]:
    """The entries made under `compat`, from their headers only. Corrupt files are removed,
    files made under another key or format are left alone, and both are logged."""
    entries: list[Entry] = []
    foreign: list[int] = []
    for item in os.scandir(directory):
        if is_temp_file(item.name):
            _remove_stale_temp(item)
        elif item.name.endswith(SUFFIX) and item.is_file():
            try:
                found = _header_of(item)
            except IncompatibleStateFile:
                foreign.append(_size(item))
                continue
            if found is not None and found[0].compat != compat:
                foreign.append(found[1].st_size)
            elif found is not None:
                header, st = found
                entries.append(Entry(item.path, header.tokens, header.adapters, st.st_size,
                                     st.st_mtime))
    if foreign:
        log.warning("disk cache %s: ignoring %d state file(s), %d bytes, made for another "
                    "model file, llama.cpp build or format version", directory, len(foreign),
                    sum(foreign))
    return entries


def _header_of(item: os.DirEntry[str]) -> tuple[StateHeader, os.stat_result] | None:
    """None when the file cannot be used (logged; removed if corrupt)."""
    try:
        st = item.stat()
        with open(item.path, "rb") as f:
            return read_header(f, st.st_size), st
    except CorruptStateFile as exc:
        log.warning("disk cache: %s is corrupt (%s); removed", item.path, exc)
        remove_quietly(item.path)
    except OSError as exc:
        log.warning("disk cache: cannot read %s: %s", item.path, exc)
    return None


def _remove_stale_temp(item: os.DirEntry[str]) -> None:
    # A crash mid-write leaves a temporary file; a recent one may belong to a live writer.
    try:
        if time.time() - item.stat().st_mtime > _STALE_TEMP_SECONDS:
            remove_quietly(item.path)
    except OSError:
        pass


def _size(item: os.DirEntry[str]) -> int:
    try:
        return item.stat().st_size
    except OSError:
        return 0
