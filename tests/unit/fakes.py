"""A deterministic stand-in for llama.cpp, for testing the scheduler's logic without a model."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from lmserve.core.images import MediaSpan
from lmserve.core.request import SamplingParams

VOCAB = 50
EOS = 0


def next_token(last: int, pos: int) -> int:
    """The fake model: the next token depends only on the last token and its position."""
    return 1 + (last * 7 + pos * 3) % (VOCAB - 1)


def adapter_shift(adapters: tuple[tuple[str, float], ...]) -> int:
    """The fake LoRA effect: an adapter set moves the fake model's positions by this much."""
    return sum(len(path) + round(scale * 10) for path, scale in adapters)


def fake_logits(last: int, pos: int) -> np.ndarray:
    """The fake model's logits row: next_token(last, pos) is the most likely token, and the
    others fall off with their distance from it (all distinct)."""
    distance = (np.arange(VOCAB) - next_token(last, pos)) % VOCAB
    return (-0.37 * distance + 0.01 * (last % 5)).astype(np.float32)


class FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple[int, int, int, bool]] = []  # token, pos, seq, logits

    @property
    def n(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries = []

    def add(self, tokens: list[int], start_pos: int, seq_id: int, want_last_logits: bool) -> int:
        for i, tok in enumerate(tokens):
            last = want_last_logits and i == len(tokens) - 1
            self.entries.append((tok, start_pos + i, seq_id, last))
        assert len(self.entries) <= self.capacity, "batch overflow"
        return len(self.entries) - 1

    def request_logits(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            tok, pos, seq, _ = self.entries[i]
            self.entries[i] = (tok, pos, seq, True)


class FakeSampler:
    def __init__(self, banned: Iterable[int], eos_after: int | None) -> None:
        self.banned = set(banned)
        self.eos_after = eos_after
        self.count = 0
        self.freed = False

    def sample(self, ctx: "FakeRunner", idx: int) -> int:
        token, pos, _seq, logits = ctx.batch.entries[idx]
        assert logits, "sampled a row without logits"
        self.count += 1
        if self.eos_after is not None and self.count > self.eos_after and EOS not in self.banned:
            return EOS
        tok = next_token(token, pos + adapter_shift(ctx.adapters))
        return tok if tok not in self.banned else (tok % (VOCAB - 1)) + 1

    def free(self) -> None:
        self.freed = True


class FakeRunner:
    """KV per sequence id as token lists; decode checks positions continue the KV exactly."""

    def __init__(self, *, n_ctx: int = 4096, batch: int = 64, kv_capacity: int | None = None,
                 eos_after: int | None = None) -> None:
        self.n_ctx = n_ctx
        self.n_vocab = VOCAB
        self.batch = FakeBatch(batch)
        self.eog_tokens = frozenset({EOS})
        self.kv: dict[int, list[int]] = {}
        self.kv_capacity = kv_capacity
        self.eos_after = eos_after
        self.decodes: list[list[tuple[int, int, int, bool]]] = []
        self.encoded: set[str] = set()  # image keys decode_media has seen
        self.media_decodes: list[tuple[int, str, int]] = []  # (seq, key, decodes before)
        self.samplers: list[FakeSampler] = []
        self.adapters: tuple[tuple[str, float], ...] = ()  # the LoRA set applied now
        self.adapter_switches = 0

    def set_adapters(self, adapters: tuple[tuple[str, float], ...]) -> None:
        self.adapters = adapters
        self.adapter_switches += 1

    def piece(self, token: int) -> bytes:
        return b"" if token == EOS else f"<{token}>".encode()

    def token_bytes(self, token: int) -> bytes:
        return b"</s>" if token == EOS else f"<{token}>".encode()

    def logits_row(self, batch_index: int) -> np.ndarray:
        token, pos, _seq, logits = self.batch.entries[batch_index]
        assert logits, "read a row decoded without logits"
        return fake_logits(token, pos)

    def make_sampler(self, params: SamplingParams, seed: int, banned: Iterable[int]) -> FakeSampler:
        sampler = FakeSampler(banned, self.eos_after)
        self.samplers.append(sampler)
        return sampler

    def decode(self, batch: FakeBatch) -> int:
        added: dict[int, int] = {}
        for _tok, _pos, seq, _l in batch.entries:
            added[seq] = added.get(seq, 0) + 1
        if self.kv_capacity is not None:
            used = sum(len(v) for v in self.kv.values())
            if used + batch.n > self.kv_capacity:
                return 1
        for tok, pos, seq, _l in batch.entries:
            cells = self.kv.setdefault(seq, [])
            assert pos == len(cells), f"seq {seq}: position {pos} but KV holds {len(cells)}"
            cells.append(tok)
        self.decodes.append(list(batch.entries))
        return 0

    def decode_media(self, span: MediaSpan, seq_id: int) -> tuple[int, bool]:
        """An image's positions filled in the KV (with the span's key as their content), as
        one call of its own; a key seen before counts as an embedding-cache hit."""
        cells = self.kv.setdefault(seq_id, [])
        assert span.start == len(cells), f"image at {span.start} but KV holds {len(cells)}"
        cells.extend([span.key] * span.n_tokens)  # type: ignore[list-item]
        hit = span.key in self.encoded
        self.encoded.add(span.key)
        self.media_decodes.append((seq_id, span.key, len(self.decodes)))
        return 0, hit

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        cells = self.kv.get(seq_id, [])
        start = 0 if p0 < 0 else p0
        assert p1 < 0, "only suffix removal is used"
        self.kv[seq_id] = cells[:start]
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        assert not self.kv.get(dst), "copy into a non-empty sequence"
        cells = self.kv.get(src, [])
        self.kv[dst] = list(cells[: (len(cells) if p1 < 0 else p1)])


def reference_output(prompt: list[int], n: int,
                     adapters: tuple[tuple[str, float], ...] = ()) -> list[int]:
    """What the fake model generates for a prompt run alone (greedy, no EOS)."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens[-1], len(tokens) - 1 + adapter_shift(adapters)))
    return tokens[len(prompt):]
