"""kv_state: a sequence's llama.cpp state moved between contexts with other stream counts."""

from __future__ import annotations

import struct

import pytest

from lmserve.engine import kv_state

HEADER = struct.pack("<Ii", 0xAF143CD8, 5)


def section(n_stream: int, stream: int, payload: bytes) -> bytes:
    """A cache's section as llama.cpp writes one sequence: its stream's cell count and
    payload, every other stream empty."""
    words = [struct.pack("<I", n_stream)]
    for s in range(n_stream):
        words.append(struct.pack("<I", 3) + payload if s == stream and payload else
                     struct.pack("<I", 0))
    return b"".join(words)


@pytest.mark.parametrize("n_stream,stream", [(1, 0), (10, 0), (10, 4), (10, 9)])
@pytest.mark.parametrize("to_streams,to_stream", [(1, 0), (3, 2), (12, 7)])
def test_a_state_moves_between_stream_counts(n_stream, stream, to_streams, to_stream):
    full, windowed = b"full-attention cells" * 3, b"windowed cells"
    state = HEADER + section(n_stream, stream, full) + section(n_stream, stream, windowed)
    last = len(section(n_stream, stream, windowed))
    envelope = kv_state.portable(bytearray(state), n_stream, stream, last_section=last)
    out = kv_state.native(envelope, to_streams, to_stream)
    assert out == HEADER + section(to_streams, to_stream, full) + \
        section(to_streams, to_stream, windowed)
    # and back again
    again = kv_state.portable(out, to_streams, to_stream, last_section=len(
        section(to_streams, to_stream, windowed)))
    assert kv_state.native(again, n_stream, stream) == state


def test_one_section_and_an_empty_sequence():
    state = HEADER + section(4, 2, b"cells")
    assert kv_state.native(kv_state.portable(state, 4, 2), 2, 1) == HEADER + section(2, 1, b"cells")
    empty = HEADER + section(4, 2, b"")
    assert kv_state.native(kv_state.portable(empty, 4, 2), 1, 0) == HEADER + section(1, 0, b"")


def test_states_of_another_shape_are_refused():
    state = HEADER + section(4, 2, b"cells")
    with pytest.raises(kv_state.StateFormatError, match="streams"):
        kv_state.portable(state, 8, 2)  # another context's stream count
    with pytest.raises(kv_state.StateFormatError, match="outside its own stream"):
        kv_state.portable(state, 4, 1)  # the cells are in stream 2, not 1
    with pytest.raises(kv_state.StateFormatError, match="not a portable"):
        kv_state.native(bytearray(state), 4, 2)  # a raw state, not an envelope
    envelope = kv_state.portable(state, 4, 2)
    with pytest.raises(kv_state.StateFormatError, match="lengths"):
        kv_state.native(envelope[:-1], 4, 2)
