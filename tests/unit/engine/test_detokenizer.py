"""Tests for lmserve.engine.detokenizer: UTF-8 reassembly and streaming stop strings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.engine.detokenizer import IncrementalDecoder, StopMatcher

# --------------------------------------------------------------------------- helpers


def decode_chunks(chunks: list[bytes]) -> tuple[list[str], str]:
    dec = IncrementalDecoder()
    outs = [dec.push(c) for c in chunks]
    return outs, dec.flush()


def split_at(data, cuts):
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def run_stops(stops, chunks) -> tuple[str, str | None, str]:
    """Feed chunks; return (emitted text, matched stop, flushed text)."""
    m = StopMatcher(stops)
    emitted, matched = [], None
    for c in chunks:
        text, matched = m.push(c)
        emitted.append(text)
    assert m.matched == matched
    return "".join(emitted), matched, m.flush()


def reference(text: str, stops) -> tuple[str, str | None]:
    """First stop to complete wins; ties on the end position go to the longest stop."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            stop = max(hits, key=len)
            return text[: end - len(stop)], stop
    return text, None


# --------------------------------------------------------------------------- IncrementalDecoder

MULTIBYTE = ["😀", "中文", "héllo wörld", "a🎉b中c", "👩‍💻", "\U0010ffff", "€"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_decoder_every_single_split(text: str) -> None:
    data = text.encode()
    for cut in range(len(data) + 1):
        outs, tail = decode_chunks(split_at(data, [cut]))
        assert "".join(outs) == text
        assert tail == ""


@pytest.mark.parametrize("text", MULTIBYTE)
def test_decoder_byte_by_byte(text: str) -> None:
    dec = IncrementalDecoder()
    out = []
    for b in text.encode():
        out.append(dec.push(bytes([b])))
        assert len(dec.pending) <= 3
    assert "".join(out) == text
    assert dec.pending == b""


def test_decoder_emits_only_complete_chars() -> None:
    dec = IncrementalDecoder()
    emoji = "😀".encode()
    assert dec.push(b"hi " + emoji[:1]) == "hi "
    assert dec.pending == emoji[:1]
    assert dec.push(emoji[1:3]) == ""
    assert dec.pending == emoji[:3]
    assert dec.push(emoji[3:] + b"!") == "😀!"
    assert dec.pending == b""


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff", "\ufffd"),
        (b"\x80", "\ufffd"),  # stray continuation byte
        (b"a\xbfb", "a\ufffdb"),
        (b"\xc0", "\ufffd"),  # overlong lead
        (b"\xe2\x28", "\ufffd("),  # lead followed by a non-continuation
        (b"\xf4\x90", "\ufffd\ufffd"),  # beyond U+10FFFF
        (b"\xed\xa0", "\ufffd\ufffd"),  # surrogate prefix can never complete
    ],
)
def test_decoder_invalid_bytes_emitted_immediately(data: bytes, expected: str) -> None:
    dec = IncrementalDecoder()
    assert dec.push(data) == expected
    assert dec.pending == b""


def test_decoder_invalid_does_not_block_following_text() -> None:
    dec = IncrementalDecoder()
    assert dec.push(b"\xe2\x82") == ""
    assert dec.push(b"x") == "\ufffdx"
    assert dec.push("中".encode()) == "中"


def test_decoder_surrogate_split_matches_unsplit() -> None:
    data = b"\xed\xa0\x80ok"
    expected = data.decode("utf-8", "replace")
    for cut in range(len(data) + 1):
        outs, tail = decode_chunks(split_at(data, [cut]))
        assert "".join(outs) + tail == expected


def test_decoder_flush_dangling_partial() -> None:
    dec = IncrementalDecoder()
    assert dec.push(b"ok" + "😀".encode()[:3]) == "ok"
    assert dec.flush() == "\ufffd"
    assert dec.pending == b""
    assert dec.flush() == ""
    assert dec.push("é".encode()) == "é"  # usable after flush


@given(st.binary(max_size=40), st.lists(st.integers(0, 40), max_size=8))
def test_decoder_any_split_equals_bulk_decode(data: bytes, cuts: list[int]) -> None:
    outs, tail = decode_chunks(split_at(data, [c for c in cuts if c <= len(data)]))
    assert "".join(outs) + tail == data.decode("utf-8", errors="replace")


@given(st.text(max_size=30), st.lists(st.integers(0, 120), max_size=8))
def test_decoder_valid_text_never_needs_flush(text: str, cuts: list[int]) -> None:
    data = text.encode()  # st.text() excludes surrogates
    outs, tail = decode_chunks(split_at(data, [c for c in cuts if c <= len(data)]))
    assert "".join(outs) == text and tail == ""


# --------------------------------------------------------------------------- StopMatcher


def test_no_stops_passthrough() -> None:
    m = StopMatcher([])
    assert m.push("hello") == ("hello", None)
    assert m.push("") == ("", None)
    assert m.flush() == ""
    assert StopMatcher(["", ""]).push("abc") == ("abc", None)


def test_stop_within_one_chunk() -> None:
    assert run_stops(["STOP"], ["hello STOP world"]) == ("hello ", "STOP", "")


def test_stop_spanning_two_chunks() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("answer</") == ("answer", None)
    assert m.push("s>more") == ("", "</s>")
    assert m.matched == "</s>"
    assert m.push("again") == ("", "</s>")
    assert m.flush() == ""


def test_stop_spanning_three_chunks() -> None:
    m = StopMatcher(["<|end|>"])
    assert m.push("x<|") == ("x", None)
    assert m.push("en") == ("", None)
    assert m.push("d|>tail") == ("", "<|end|>")


def test_partial_prefix_then_divergence_releases_text() -> None:
    m = StopMatcher(["<|end|>"])
    assert m.push("a<|e") == ("a", None)
    assert m.push("x") == ("<|ex", None)
    assert m.push("<") == ("", None)
    assert m.flush() == "<"
    assert m.matched is None


def test_divergence_keeps_new_prefix() -> None:
    # "xaaa" diverges from "aab" at the third "a" but the last two still prefix the stop.
    m = StopMatcher(["aab"])
    assert m.push("xaa") == ("x", None)
    assert m.push("a") == ("a", None)  # "aaa": keep "aa", release one "a"
    assert m.push("b!") == ("", "aab")


def test_holds_only_longest_suffix_that_is_prefix() -> None:
    m = StopMatcher(["abc", "xyz"])
    assert m.push("hello ab") == ("hello ", None)
    assert m.push("x") == ("ab", None)  # "x" may start "xyz"
    assert m.push("y!") == ("xy!", None)
    assert m.push("xy") == ("", None)
    assert m.flush() == "xy"


def test_stop_at_very_start() -> None:
    assert run_stops(["###"], ["###", "after"]) == ("", "###", "")
    assert run_stops(["#"], ["#"]) == ("", "#", "")


def test_overlapping_stops_first_completed_wins() -> None:
    assert run_stops(["ab", "bc"], ["abc"]) == ("", "ab", "")
    assert run_stops(["bc", "ab"], ["a", "b", "c"]) == ("", "ab", "")
    assert run_stops(["ab", "bc"], ["xbc"]) == ("x", "bc", "")


def test_earlier_completion_beats_earlier_start() -> None:
    # Documented choice: "bc" completes (at "abc") before "abcd" could, so it wins.
    assert run_stops(["abcd", "bc"], ["abcd"]) == ("a", "bc", "")
    assert run_stops(["abcd", "bc"], ["ab", "cd"]) == ("a", "bc", "")


def test_same_start_shorter_completes_first() -> None:
    assert run_stops(["abc", "ab"], ["abc"]) == ("", "ab", "")


def test_same_end_longest_wins() -> None:
    assert run_stops(["bc", "abc"], ["xabc"]) == ("x", "abc", "")
    assert run_stops(["c", "abc"], ["a", "b", "c"]) == ("", "abc", "")


def test_duplicates_and_empty_stops() -> None:
    assert run_stops(["x", "", "x"], ["abxcd"]) == ("ab", "x", "")


def test_unicode_stops() -> None:
    assert run_stops(["。\n"], ["你好", "。", "\n再见"]) == ("你好", "。\n", "")


def test_no_match_flush_releases_everything() -> None:
    emitted, matched, tail = run_stops(["Observation:"], ["Thought: x\nObserv"])
    assert matched is None
    assert emitted == "Thought: x\n"
    assert tail == "Observ"


def test_held_text_bounded_by_longest_stop() -> None:
    m = StopMatcher(["aaaa"])
    total = ""
    for _ in range(50):
        out, _ = m.push("aaa")
        total += out
        if m.matched:
            break
    assert m.matched == "aaaa"
    assert total == ""
    m = StopMatcher(["abcd"])
    emitted = ""
    for i in range(1, 51):
        emitted += m.push("abc")[0]
        assert 3 * i - len(emitted) == 3  # only the last "abc" is held
    assert m.push("d") == ("", "abcd")


ALPHABET = "abc"


@settings(max_examples=400)
@given(
    text=st.text(ALPHABET, max_size=30),
    stop=st.text(ALPHABET, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_single_stop_any_split_matches_find(text: str, stop: str, cuts: list[int]) -> None:
    chunks = split_at(text, [c for c in cuts if c <= len(text)])
    emitted, matched, tail = run_stops([stop], chunks)
    pos = text.find(stop)
    if pos < 0:
        assert (matched, emitted + tail) == (None, text)
    else:
        assert (matched, emitted, tail) == (stop, text[:pos], "")


@settings(max_examples=600)
@given(
    text=st.text(ALPHABET, max_size=30),
    stops=st.lists(st.text(ALPHABET, max_size=5), max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_many_stops_any_split_matches_reference(text: str, stops: list[str], cuts) -> None:
    chunks = split_at(text, [c for c in cuts if c <= len(text)])
    m = StopMatcher(stops)
    emitted = ""
    for c in chunks:
        out, matched = m.push(c)
        emitted += out
        # Never emit anything that could still become (part of) a stop.
        if matched is None:
            assert reference(emitted, stops)[1] is None
    ref_text, ref_stop = reference(text, stops)
    assert m.matched == ref_stop
    tail = m.flush()
    assert emitted + tail == ref_text
    if ref_stop is not None:
        assert tail == ""


def longest_held_suffix(text: str, stops: list[str]) -> int:
    return max(
        (k for k in range(1, len(text) + 1) for s in stops if k < len(s) and s.startswith(text[-k:])),
        default=0,
    )


@settings(max_examples=300)
@given(
    text=st.text(ALPHABET, max_size=30),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4),
)
def test_holds_exactly_longest_suffix_that_is_proper_prefix(text: str, stops: list[str]) -> None:
    m = StopMatcher(stops)
    emitted = ""
    for i, ch in enumerate(text, 1):
        out, matched = m.push(ch)
        emitted += out
        if matched:
            return
        assert len(text[:i]) - len(emitted) == longest_held_suffix(text[:i], stops)
    assert emitted + m.flush() == text
