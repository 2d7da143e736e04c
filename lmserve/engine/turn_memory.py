"""The token ids of recent answers, so that a conversation's next request reuses the KV its
previous answer left.

A chat client sends the model's answer back as text, and the next prompt is tokenized from
text. The model did not always write that text in the tokens a tokenizer would choose: under a
grammar, or just by sampling, it may write `{"` as `{` then `"`, and the re-tokenized prompt
then leaves the KV it came from at that token, so everything after it is computed again (in an
agent loop: the call and every tool result after it).

TurnMemory keeps, for the last `capacity` finished answers, the prompt text and ids the answer
followed and the ids it wrote. A new prompt whose text starts with one of those prompts and goes
on with the answer's text is tokenized as that prompt's ids, then the answer's own ids as far as
their text matches, then the rest as usual. The ids are the ones the KV holds, so the prefix
cache finds them; the text is the client's, unchanged. Where nothing matches, the prompt is
tokenized as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

DEFAULT_CAPACITY = 256  # answers remembered (about a few MB: ids and prompt bytes)
MIN_REUSED_TOKENS = 4  # an answer that matches for fewer ids than this is not worth a split


@dataclass(frozen=True)
class _Turn:
    prompt: bytes  # the prompt's text, UTF-8
    prompt_tokens: tuple[int, ...]
    output: tuple[int, ...]  # the answer's ids, up to its end-of-generation token
    pieces: tuple[bytes, ...]  # each output id's bytes


@dataclass(frozen=True)
class Reuse:
    """A prompt's ids up to `n_bytes` of its text, taken from a remembered answer."""

    tokens: list[int]
    n_bytes: int
    n_output: int  # of those, the answer's own ids


class TurnMemory:
    """Recent (prompt text, prompt ids, answer ids) triples, newest last. Thread-safe: answers
    are remembered on the event loop and prompts prepared wherever the dialect runs."""

    def __init__(self, piece: Callable[[int], bytes], eog_tokens: Iterable[int] = (), *,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.piece = piece  # a token's bytes, control tokens as their text
        self.eog = frozenset(eog_tokens)
        self.capacity = capacity
        self._turns: OrderedDict[bytes, _Turn] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # prompts tokenized with a remembered answer's ids

    def __len__(self) -> int:
        return len(self._turns)

    def remember(self, prompt_text: str, prompt_tokens: Sequence[int],
                 output: Sequence[int]) -> None:
        """A finished answer: `output` as the engine sampled it (an end-of-generation id ends
        it; the rest of the ids are dropped with it)."""
        kept: list[int] = []
        for token in output:
            if token in self.eog:
                break
            kept.append(token)
        if not kept or not prompt_text:
            return
        prompt = prompt_text.encode("utf-8")
        turn = _Turn(prompt, tuple(prompt_tokens), tuple(kept),
                     tuple(self.piece(t) for t in kept))
        key = prompt + b"".join(turn.pieces)
        with self._lock:
            self._turns.pop(key, None)
            self._turns[key] = turn
            while len(self._turns) > self.capacity:
                self._turns.popitem(last=False)

    def reuse(self, text: str) -> Reuse | None:
        """The longest remembered prefix of `text` that ends inside an answer, as ids; None
        when no remembered answer continues a prefix of it."""
        data = text.encode("utf-8")
        with self._lock:
            turns = list(self._turns.values())
        best: Reuse | None = None
        for turn in reversed(turns):
            if len(turn.prompt) >= len(data) or not data.startswith(turn.prompt):
                continue
            at, n = len(turn.prompt), 0
            for piece in turn.pieces:
                if not data.startswith(piece, at):
                    break
                at += len(piece)
                n += 1
            while n and not _boundary(data, at):  # never cut a character in two
                n -= 1
                at -= len(turn.pieces[n])
            if n < MIN_REUSED_TOKENS or (best is not None and at <= best.n_bytes):
                continue
            best = Reuse([*turn.prompt_tokens, *turn.output[:n]], at, n)
        return best

    def tokenize(self, text: str, tokenize: Callable[[str, bool], list[int]]) -> list[int]:
        """`text`'s ids: a remembered answer's where one continues a prefix of it, the rest by
        `tokenize(text, add_special)`."""
        found = self.reuse(text)
        if found is None:
            return tokenize(text, True)
        self.hits += 1
        rest = text.encode("utf-8")[found.n_bytes:].decode("utf-8")
        return found.tokens + (tokenize(rest, False) if rest else [])


def _boundary(data: bytes, at: int) -> bool:
    """Whether byte offset `at` of UTF-8 `data` starts a character (or is its end)."""
    return at >= len(data) or (data[at] & 0xC0) != 0x80
