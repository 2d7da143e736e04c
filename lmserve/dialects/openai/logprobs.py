"""Pure: neutral TokenLogprobs -> OpenAI logprobs objects.

Chat: choice.logprobs = {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal"}.
Completions (the legacy shape evaluation harnesses read): choice.logprobs = {tokens,
token_logprobs, top_logprobs (token -> logprob, always holding the chosen token, so up to
N + 1 entries as OpenAI documents), text_offset}. With echo the prompt tokens come first, and
the first one has a null logprob and null alternatives.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Any

from lmserve.core.events import TokenLogprob, TopLogprob


def token_string(piece: bytes) -> str:
    """A token may hold part of a UTF-8 character: its bytes are shown escaped, as OpenAI does;
    the `bytes` field keeps the exact value."""
    return piece.decode("utf-8", "backslashreplace")


# -- chat ------------------------------------------------------------------------------------

def _chat_alternative(alt: TopLogprob) -> dict[str, Any]:
    return {"token": token_string(alt.piece), "logprob": alt.logprob, "bytes": list(alt.piece)}


def chat_content(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": token_string(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
             "top_logprobs": [_chat_alternative(alt) for alt in e.top]} for e in entries]


def chat_logprobs(entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """None when the request did not ask for logprobs."""
    if entries is None:
        return None
    return {"content": chat_content(entries), "refusal": None}


# -- completions -----------------------------------------------------------------------------

class TextOffsets:
    """Character offsets of successive tokens within a choice's text (kept across chunks).

    Bytes go through an incremental UTF-8 decoder, so a character split over two tokens
    counts once. Control tokens count with their text; the only ones a completion's text
    lacks are an added BOS (handled by `skip_unseen_first`) and a final end-of-text token,
    which shifts nothing after it."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0

    def advance(self, piece: bytes) -> int:
        offset = self.chars
        self.chars += len(self._decoder.decode(piece))
        return offset


def _top_dict(entry: TokenLogprob) -> dict[str, float] | None:
    if entry.logprob is None:
        return None
    top: dict[str, float] = {}
    for alt in entry.top:  # two tokens may show as the same text: the likelier one stays
        top.setdefault(token_string(alt.piece), alt.logprob)
    top.setdefault(token_string(entry.piece), entry.logprob)
    return top


def completion_logprobs(entries: Sequence[TokenLogprob], offsets: TextOffsets, *,
                        text: str | None = None) -> dict[str, Any]:
    """The legacy arrays for these tokens. `text`: the echoed prompt, when `entries` start with
    the prompt's tokens; a first token whose text it does not start with (a BOS the tokenizer
    added) then takes no room."""
    tokens = [token_string(e.piece) for e in entries]
    text_offset = []
    for i, entry in enumerate(entries):
        if i == 0 and text is not None and not text.startswith(tokens[0]):
            text_offset.append(offsets.chars)
            continue
        text_offset.append(offsets.advance(entry.piece))
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_top_dict(e) for e in entries], "text_offset": text_offset}


def choice_completion_logprobs(prompt: Sequence[TokenLogprob] | None,
                               generated: Sequence[TokenLogprob] | None,
                               echo_text: str | None) -> dict[str, Any] | None:
    """A whole (non-streamed) choice: the echoed prompt's tokens, then the generated ones."""
    if generated is None:
        return None
    offsets = TextOffsets()
    if not prompt:
        return completion_logprobs(generated, offsets)
    return completion_logprobs([*prompt, *generated], offsets, text=echo_text)


class StreamOffsets:
    """Per-choice TextOffsets for a completions stream."""

    def __init__(self) -> None:
        self._choices: dict[int, TextOffsets] = {}

    def chunk(self, index: int, entries: Sequence[TokenLogprob] | None,
              echo_text: str | None = None) -> dict[str, Any] | None:
        if entries is None:
            return None
        offsets = self._choices.setdefault(index, TextOffsets())
        return completion_logprobs(entries, offsets, text=echo_text)


def with_logprobs(chunks: list[dict[str, Any]], logprobs: dict[str, Any] | None,
                  empty_chunk: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """Put one engine step's logprobs on the first chunk it produced, or on an empty-delta
    chunk when a parser or the stop matcher holds its text back, so none are lost."""
    if logprobs is None:
        return chunks
    if not chunks:
        chunks = [empty_chunk()]
    chunks[0]["choices"][0]["logprobs"] = logprobs
    return chunks
