"""Speculative decoding with the model's own MTP (multi-token prediction) / NextN layers
(`--draft mtp`): a GGUF that carries them (GLM-4.5, DeepSeek-V3, Qwen3.5, ... in llama.cpp's
terms `nextn_predict_layers`) is loaded with them, and a context of type MTP runs the head.

The head predicts the token after next: its row at position p takes the token at p and the
target's hidden state at p-1 (the input of the target's output norm), and outputs logits for
p+1 and its own hidden state. So the drafter needs the target's hidden state of every row the
target decodes (runner.enable_hidden_rows): after each engine step (`observe`) it decodes
those rows into the head's KV, one row per target row, paired with the preceding row's state
(or the state the sequence's previous step ended with). Drafting then feeds the sequence's
newest token paired with the last verified state, takes the greedy guess, and goes on with
the guess paired with the head's own state, up to the draft length. The drafted rows leave
the head's KV at once; the target verifies the guesses exactly as it verifies prompt-lookup
and draft-model guesses (EngineCore._verify), and the rows it decodes replace them at the
next `observe` (rejected ones are cut back the same way, by comparing tokens).

A sequence's head KV starts where the target's hidden states do: a prompt prefix reused from
the cache (or a sibling's fork) has none, and the head attends over what it saw; that makes
guesses worse, never output different.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lmserve.engine.draft_model import DECODE_OK, Tracks, _common_prefix, _length
from lmserve.engine.lookup import DraftLength
from lmserve.engine.sequence import Sequence


class MtpRunner(Protocol):
    """The MTP context (runner.MtpContext, or a fake in the unit tests)."""

    capacity: int
    n_embd: int
    def decode(self, rows: Tokens[tuple[int, int, int, bool]], hidden: np.ndarray) -> int: ...
    def logits_row(self, batch_index: int) -> np.ndarray: ...
    def hidden_row(self, batch_index: int) -> np.ndarray: ...
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def clear(self) -> None: ...


@dataclass(eq=False)
class _Track:
    """One sequence in the MTP context: its id there; the tokens whose head KV it holds, at
    positions base, base+1, ...; and the target's hidden states of its rows in the last step
    (positions h_start, h_start+1, ...)."""

    seq_id: int
    base: int = 0
    tokens: list[int] = field(default_factory=list)
    h_start: int = 0
    hidden: np.ndarray | None = None

    @property
    def end(self) -> int:
        return self.base + len(self.tokens)


class MtpDrafter:
    """Greedy drafts from the model's MTP head for the engine's decoding sequences."""

    def __init__(self, ctx: MtpRunner, target_hidden: Callable[[int, int], np.ndarray], *,
                 max_tokens: int, n_seqs: int, eog_tokens: Iterable[int] = (),
                 row_cost: float = 0.5) -> None:
        self.ctx = ctx
        self.target_hidden = target_hidden  # (first batch row, rows) of the target's decode
        self.max_tokens = max_tokens
        self.eog_tokens = frozenset(eog_tokens)
        self.row_cost = row_cost
        self._tracks = Tracks(n_seqs, _Track, ctx.seq_rm)
        self._zero = np.zeros(ctx.n_embd, dtype=np.float32)
        self.failures = 0  # head decodes that failed (the MTP context was cleared)

    def length(self) -> DraftLength:
        return _length(self.max_tokens, self.row_cost)

    @property
    def tracked(self) -> int:
        return len(self._tracks)

    def forget(self, seq: Sequence) -> None:
        self._tracks.release(seq)

    def _reset(self, track: _Track, base: int) -> None:
        self.ctx.seq_rm(track.seq_id, -1, -1)
        track.base, track.tokens = base, []

    def _cut(self, track: _Track, position: int) -> None:
        """Drop the head KV at positions >= position."""
        if position <= track.base:
            self._reset(track, position)
        elif position < track.end:
            self.ctx.seq_rm(track.seq_id, position, -1)
            del track.tokens[position - track.base:]

    def _state_before(self, track: _Track, position: int) -> np.ndarray:
        """The target's hidden state at position-1, zeros where none was kept."""
        i = position - 1 - track.h_start
        if track.hidden is not None and 0 <= i < len(track.hidden):
            row: np.ndarray = track.hidden[i]
            return row
        return self._zero

    # -- after each engine step: the target's rows into the head's KV --------------------------
    def observe(self, rows: Tokens[tuple[Sequence, int, int, Tokens[int]]]) -> None:
        """The target decoded `tokens` of each sequence at positions start.. from batch row
        first: decode them into the head's KV, each paired with the state before it."""
        feed: list[tuple[int, int, int, bool]] = []
        states: list[np.ndarray] = []
        for seq, first, start, tokens in rows:
            if seq.request.media or not tokens:
                continue  # an image's stand-in ids are no tokens (and such never draft)
            track = self._tracks.take(seq)
            if track is None:
                continue
            if start != track.end:  # rejected guesses, or a gap (a reused prefix)
                if track.base <= start < track.end:
                    self._cut(track, start)
                else:
                    self._reset(track, start)
            hidden = self.target_hidden(first, len(tokens))
            states.append(self._state_before(track, start)[None, :])
            states.append(hidden[:-1])
            feed.extend((token, start + i, track.seq_id, False) for i, token in enumerate(tokens))
            track.tokens.extend(tokens)
            track.h_start, track.hidden = start, hidden
        if feed:
            self._decode(feed, np.concatenate(states))

    # -- drafting ---------------------------------------------------------------------------
    def draft(self, wanted: list[tuple[Sequence, int]]) -> dict[Sequence, list[int]]:
        """Up to `limit` guesses for each (sequence, limit), after its pending token."""
        feed: list[tuple[int, int, int, bool]] = []
        states: list[np.ndarray] = []
        rows: dict[Sequence, int] = {}
        budget = self.ctx.capacity
        for seq, limit in wanted:
            track = self._tracks.get(seq)
            if track is None or limit <= 0:
                continue
            tokens = seq.tokens
            last = len(tokens) - 1  # the pending token's position
            held = _common_prefix(track.tokens, list(tokens[track.base:track.end]))
            self._cut(track, min(track.base + held, last))
            if not track.tokens:
                track.base = last
            part = tokens[track.end:]
            if len(part) > budget:
                continue
            for i, token in enumerate(part):
                pos = track.end + i
                feed.append((token, pos, track.seq_id, pos == last))
                states.append(self._state_before(track, pos))
            track.tokens.extend(part)
            budget -= len(part)
            rows[seq] = len(feed) - 1
        if not feed or not self._decode(feed, np.stack(states)):
            return {}
        limits = dict(wanted)
        drafts: dict[Sequence, list[int]] = {}
        starts = {seq: len(seq.tokens) for seq in rows}  # the first drafted position
        while rows:
            step: list[tuple[int, int, int, bool]] = []
            step_states: list[np.ndarray] = []
            nxt: dict[Sequence, int] = {}
            for seq, idx in rows.items():
                token = int(np.argmax(self.ctx.logits_row(idx)))
                draft = drafts.setdefault(seq, [])
                draft.append(token)
                if len(draft) >= limits[seq] or token in self.eog_tokens:
                    continue
                track = self._tracks[seq]
                nxt[seq] = len(step)
                step.append((token, starts[seq] + len(draft) - 1, track.seq_id, True))
                step_states.append(self.ctx.hidden_row(idx))
            rows = nxt
            if rows and not self._decode(step, np.stack(step_states)):
                break
        for seq in starts:  # the guesses' rows leave; the target's replace them
            track = self._tracks.get(seq)
            if track is not None and track.tokens:
                self.ctx.seq_rm(track.seq_id, starts[seq], -1)
        return drafts

    def _decode(self, rows: list[tuple[int, int, int, bool]], states: np.ndarray) -> bool:
        """Decode rows into the head's KV; on failure clear the MTP context, so that every
        sequence starts again from its next step's rows."""
        if self.ctx.decode(rows, states) == DECODE_OK:
            return True
        self.failures += 1
        self.ctx.clear()
        for track in self._tracks.values():
            track.tokens.clear()
            track.hidden = None
        return False
