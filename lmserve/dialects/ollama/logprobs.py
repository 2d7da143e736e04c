"""Pure: neutral TokenLogprobs -> Ollama's logprobs entries.

Ollama's shape (its api.Logprob): {"token", "logprob", "bytes", "top_logprobs": [{"token",
"logprob", "bytes"}]}. The token text of a piece that holds part of a UTF-8 character shows
U+FFFD, as Go's JSON encoder writes it; `bytes` keeps the exact value. An empty alternatives
list is left out, as Ollama omits it.
"""

from __future__ import annotations

from typing import Any

from lmserve.core.events import TokenLogprob


def logprob_entries(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{**_token(e.piece, e.logprob),
             **({"top_logprobs": [_token(a.piece, a.logprob) for a in e.top]} if e.top else {})}
            for e in entries]


def _token(piece: bytes, logprob: float | None) -> dict[str, Any]:
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}
