"""Per-token text assembly: UTF-8 reassembly of token pieces and streaming stop-string matching.

Both classes run in the engine thread for every generated token, so each call costs
O(len(new piece) + longest stop string) and never re-scans the whole output.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Sequence

__all__ = ["IncrementalDecoder", "StopMatcher"]

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class IncrementalDecoder:
    """Turns a stream of raw token bytes into text, holding back only an incomplete UTF-8 char."""

    __slots__ = ("_dec",)

    def __init__(self) -> None:
        self._dec = _Utf8Decoder(errors="replace")

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; return the text completed by them (possibly "")."""
        text = self._dec.decode(piece, False)
        pending = self._dec.getstate()[0]
        # CPython holds ED A0..BF (a UTF-16 surrogate prefix) until the next byte, although it can
        # never become valid. Resolve it now; the replacement output is the same as when unsplit.
        if len(pending) == 2 and pending[0] == 0xED and pending[1] >= 0xA0:
            text += self._dec.decode(b"", True)
            self._dec.reset()
        return text

    def flush(self) -> str:
        """End of generation: return held bytes decoded with replacement chars, and reset."""
        text = self._dec.decode(b"", True)
        self._dec.reset()
        return text

    @property
    def pending(self) -> bytes:
        """Bytes of the incomplete trailing UTF-8 sequence currently held back (at most 3)."""
        return self._dec.getstate()[0]


class StopMatcher:
    """Streaming stop-string matcher that never emits any part of a matched stop string.

    Which stop wins: the first one to *complete* in the stream (lowest end index), since that is
    the moment generation has to stop; if several complete at the same character, the longest
    (earliest-starting) one wins. For a single stop string this is exactly the first occurrence.
    E.g. stops ["abcd", "bc"] on "abcd" match "bc" and emit "a"; ["bc", "abc"] on "abc" match
    "abc". The result does not depend on how the text is split into chunks.

    Implemented as an Aho-Corasick automaton fed one character at a time: the depth of the
    current state is exactly the longest suffix of the stream that is a proper prefix of some
    stop, i.e. the amount of text that must be held back.
    """

    __slots__ = ("_goto", "_fail", "_depth", "_out", "_state", "_held", "_matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._depth: list[int] = [0]
        self._out: list[str | None] = [None]  # longest stop that is a suffix of the node's string
        for stop in stops:
            if stop:
                self._insert(stop)
        self._fail: list[int] = [0] * len(self._goto)
        self._link()
        self._state = 0
        self._held = ""
        self._matched: str | None = None

    def _insert(self, stop: str) -> None:
        node = 0
        for ch in stop:
            nxt = self._goto[node].get(ch)
            if nxt is None:
                nxt = len(self._goto)
                self._goto.append({})
                self._depth.append(self._depth[node] + 1)
                self._out.append(None)
                self._goto[node][ch] = nxt
            node = nxt
        self._out[node] = stop

    def _link(self) -> None:
        """Breadth-first computation of failure links and inherited outputs."""
        queue = deque(self._goto[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self._goto[node].items():
                f = self._fail[node]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                fc = self._goto[f].get(ch, 0)
                self._fail[child] = fc if fc != child else 0
                if self._out[child] is None:
                    self._out[child] = self._out[self._fail[child]]
                queue.append(child)

    @property
    def matched(self) -> str | None:
        """The stop string that matched, or None."""
        return self._matched

    def push(self, text: str) -> tuple[str, str | None]:
        """Feed text; return (text safe to emit now, matched stop or None)."""
        if self._matched is not None:
            return "", self._matched
        if len(self._goto) == 1:  # no stops
            return text, None
        goto, fail, out = self._goto, self._fail, self._out
        state = self._state
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            stop = out[state]
            if stop is not None:
                self._matched = stop
                self._state, pending, self._held = 0, self._held + text[: i + 1], ""
                return pending[: len(pending) - len(stop)], stop
        self._state = state
        pending = self._held + text
        keep = self._depth[state]
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], None

    def flush(self) -> str:
        """End of generation without a match: release the held-back text and reset."""
        held, self._held, self._state = self._held, "", 0
        return "" if self._matched is not None else held
