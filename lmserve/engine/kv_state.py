"""One sequence's saved KV state in a form that loads under any KV layout.

llama.cpp serialises a sequence's state (llama_state_seq_get_data) as a magic number and the
source sequence's id (8 bytes, the id ignored on loading), then its KV cache per cache: a KV cache
with sliding-window layers (iSWA) writes two caches, the full-attention one and then the
windowed one. Each cache section starts with its stream count and then, for every stream,
a cell count followed, when non-zero, by the cells' metadata and data:

    u32 n_stream, then n_stream times: u32 cell_count [cells' positions, ids, K and V rows]

A sequence's cells all lie in its own stream, so one stream of each section is non-empty,
and loading reads that one into the destination sequence's stream whatever its index. The
loader refuses a stream count other than its own ("n_stream mismatch"), so a state taken
from a context with a KV stream per slot does not load into a context with another number
of slots, or into a single pool, or the other way round.

`portable` keeps each section's non-empty stream only, in an envelope of our own that records
the sections' lengths (a section's payload does not say where it ends); `native` spreads such
an envelope back over a context's streams. The prefill lane (engine.lane) moves prompts
between a one-stream side context and the engine's context this way, and saved states (the
disk and RAM tiers) load under any --parallel and --kv-layout.

    magic b"LMKV1\\0", u32 n_sections, u64 length of each, llama.cpp's 8-byte header, then each
    section's u32 cell_count and payload (no stream count)
"""

from __future__ import annotations

import struct

MAGIC = b"LMKV1\0"
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<6sI")
LLAMA_HEADER = 8  # u32 magic, i32 sequence id


class StateFormatError(ValueError):
    """Bytes that are not a state of the expected shape."""


def portable(state: bytes | bytearray | memoryview, n_stream: int, stream: int, *,
             last_section: int = 0) -> bytearray:
    """The envelope of a state llama.cpp wrote for the sequence whose cells lie in stream
    `stream` of a context with `n_stream` streams. `last_section`: the length of the last
    cache's section when there are two (an iSWA cache's windowed one), else 0."""
    view = memoryview(state)
    if len(view) < LLAMA_HEADER:
        raise StateFormatError("a truncated KV state")
    end = len(view)
    ends = [end - last_section, end] if 0 < last_section < end - LLAMA_HEADER else [end]
    bodies: list[memoryview] = []
    start = LLAMA_HEADER
    for end in ends:
        section = view[start:end]
        if len(section) < 4 + 4 * n_stream or _U32.unpack_from(section, 0)[0] != n_stream:
            raise StateFormatError(f"a KV section of {len(section)} bytes does not start with "
                                   f"the context's {n_stream} streams")
        before = section[4:4 + 4 * stream]
        after = section[len(section) - 4 * (n_stream - 1 - stream):]
        if any(before.tobytes()) or any(after.tobytes()):
            raise StateFormatError("cells of this sequence lie outside its own stream")
        bodies.append(section[4 + 4 * stream:len(section) - len(after)])
        start = end
    if start != len(view):
        raise StateFormatError("the sections do not cover the state")
    out = bytearray(_HEAD.pack(MAGIC, len(bodies)))
    for body in bodies:
        out += struct.pack("<Q", len(body))
    out += view[:LLAMA_HEADER]
    for body in bodies:
        out += body
    return out


def native(envelope: bytes | bytearray | memoryview, n_stream: int, stream: int) -> bytearray:
    """The state llama.cpp reads into a sequence of a context with `n_stream` streams whose
    cells go to stream `stream`, from `portable`'s envelope."""
    view = memoryview(envelope)
    if len(view) < _HEAD.size or bytes(view[:len(MAGIC)]) != MAGIC:
        raise StateFormatError("not a portable KV state")
    n_sections = _HEAD.unpack_from(view, 0)[1]
    offset = _HEAD.size + 8 * n_sections + LLAMA_HEADER
    if len(view) < offset:
        raise StateFormatError("a truncated portable KV state")
    lengths = struct.unpack_from(f"<{n_sections}Q", view, _HEAD.size)
    if offset + sum(lengths) != len(view):
        raise StateFormatError("the sections' lengths do not match the state's size")
    zeros_before, zeros_after = bytes(4 * stream), bytes(4 * (n_stream - 1 - stream))
    out = bytearray(view[offset - LLAMA_HEADER:offset])
    for length in lengths:
        out += _U32.pack(n_stream)
        out += zeros_before
        out += view[offset:offset + length]
        out += zeros_after
        offset += length
    return out
