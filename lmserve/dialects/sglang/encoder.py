"""Pure translation: choice steps -> SGLang /generate bodies and stream frames, model and
server info, error bodies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lmserve.core.backend import ChoiceStep
from lmserve.core.errors import LmserveError
from lmserve.core.events import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    TokenLogprob,
    TokenOutput,
)
from lmserve.core.observe import with_request_id

Step = ChoiceStep | TokenOutput  # what a sample reads: the same attribute names on both

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(^|_)(api_?keys?|passwords?|secrets?|token|credentials?)$", re.I)


def error_body(exc: LmserveError) -> dict[str, Any]:
    """SGLang's error envelope: {"error": {"message"}}, with its ErrorResponse fields beside."""
    status = exc.kind.http_status
    return with_request_id({"error": {"message": exc.message, "type": HTTPStatus(status).phrase,
                                      "param": exc.param, "code": status}})


def finish_reason(out: Step, stop_token_ids: frozenset[int]) -> dict[str, Any] | None:
    """SGLang's finish reasons: stop with the matched token id or string, length, abort."""
    reason = out.finish_reason
    if reason is None:
        return None
    if reason == FINISH_STOP:
        last = out.token_ids[-1] if out.token_ids else None
        if out.stop_match is None or (last in stop_token_ids and out.stop_match == str(last)):
            return {"type": "stop", "matched": last}
        return {"type": "stop", "matched": out.stop_match}
    if reason == FINISH_LENGTH:
        return {"type": "length", "length": out.usage.completion_tokens if out.usage else None}
    if reason == FINISH_CANCELLED:
        return {"type": "abort", "message": "the request was aborted"}
    assert reason == FINISH_ERROR
    return {"type": "abort", "message": f"generation failed: {out.error}"}


@dataclass(frozen=True)
class LogprobShape:
    """How a sample reports logprobs: prompt positions from `start` (-1: none), `top`
    alternatives per position, token text or null."""

    top: int = 0
    start: int = -1
    text: bool = False


def _entry(logprob: float | None, token_id: int, piece: bytes, text: bool) -> list[Any]:
    """SGLang's [logprob, token_id, text-or-null]; a token holding part of a UTF-8 character
    shows U+FFFD, as a tokenizer's decode of that token alone does."""
    return [logprob, token_id, piece.decode("utf-8", "replace") if text else None]


def token_logprobs(entries: list[TokenLogprob], text: bool) -> list[list[Any]]:
    return [_entry(e.logprob, e.token_id, e.piece, text) for e in entries]


def top_logprobs(entries: list[TokenLogprob], text: bool) -> list[list[list[Any]] | None]:
    """Alternatives per position; None where the token has no logprob (the first prompt one)."""
    return [None if e.logprob is None else
            [_entry(alt.logprob, alt.token_id, alt.piece, text) for alt in e.top]
            for e in entries]


def logprob_meta(shape: LogprobShape, prompt: list[TokenLogprob],
                 output: list[TokenLogprob]) -> dict[str, Any]:
    meta: dict[str, Any] = {"input_token_logprobs": token_logprobs(prompt, shape.text),
                            "output_token_logprobs": token_logprobs(output, shape.text)}
    if shape.top > 0:
        meta["input_top_logprobs"] = top_logprobs(prompt, shape.text)
        meta["output_top_logprobs"] = top_logprobs(output, shape.text)
    return meta


@dataclass
class Sample:
    """One output of /generate (a prompt, or one of its n samples), text and ids cumulative."""

    rid: str
    position: int  # index in the flat output list
    prompt_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    no_stop_trim: bool = False
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    cached_tokens: int | None = None
    completion_tokens: int = 0
    e2e_latency: float | None = None  # seconds from arrival to the end, set by the route
    unsent: int = 0  # tokens since the last stream frame
    logprobs: LogprobShape | None = None  # None: return_logprob is off
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # from logprobs.start
    output_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def add(self, out: Step) -> None:
        self.text += out.text
        self.output_ids.extend(out.token_ids)
        self.completion_tokens = len(self.output_ids)
        self.unsent += len(out.token_ids)
        if self.logprobs is not None:
            self._add_logprobs(out, self.logprobs.start)
        if out.finished:
            finish = self.finish = finish_reason(out, self.stop_token_ids)
            if self.no_stop_trim and out.finish_reason == FINISH_STOP and finish is not None \
                    and finish["matched"] == out.stop_match and out.stop_match:
                self.text += out.stop_match
            if out.usage is not None:
                self.cached_tokens = out.usage.cached_tokens
                self.completion_tokens = out.usage.completion_tokens

    def _add_logprobs(self, out: Step, start: int) -> None:
        if out.prompt_logprobs is not None and start >= 0:
            self.prompt_logprobs = out.prompt_logprobs[start:]
        self.output_logprobs.extend(out.logprobs or [])

    def due(self, interval: int) -> bool:
        """Whether a stream frame should go out now (every `interval` tokens, and the last)."""
        return self.finished or self.unsent >= interval

    def body(self, *, indexed: bool) -> dict[str, Any]:
        """The cumulative body; `indexed` adds the position, as SGLang does in batch streams."""
        self.unsent = 0
        meta: dict[str, Any] = {"id": self.rid, "finish_reason": self.finish,
                                "prompt_tokens": self.prompt_tokens,
                                "completion_tokens": self.completion_tokens}
        if self.cached_tokens is not None:
            meta["cached_tokens"] = self.cached_tokens
        if self.finished and self.e2e_latency is not None:
            meta["e2e_latency"] = round(self.e2e_latency, 6)
        if self.logprobs is not None:
            meta.update(logprob_meta(self.logprobs, self.prompt_logprobs, self.output_logprobs))
        body: dict[str, Any] = {"text": self.text, "output_ids": list(self.output_ids),
                                "meta_info": meta}
        if indexed:
            body["index"] = self.position
        return body


def model_info(*, name: str, path: str, architecture: str, generation: bool,
               context_length: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """SGLang's /get_model_info fields plus the pymllm /model_info ones; a GGUF carries its
    tokenizer, so tokenizer_path is the model file."""
    return {"model_path": path, "tokenizer_path": path, "served_model_name": name,
            "model_type": architecture, "architectures": [architecture],
            "is_generation": generation, "context_length": context_length,
            "preferred_sampling_params": None, "weight_version": "default", **extra}


def redact(value: Any, secrets: frozenset[str] = frozenset()) -> Any:
    """A copy with secrets replaced: values under secret-looking keys (api_key, password,
    token...), any string equal to a known secret, and the password in URLs."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and value[k] not in (None, [], ())
                else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        return REDACTED if value in secrets else _redact_url(value)
    return value


def _redact_url(text: str) -> str:
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return REDACTED
    if parts.password is None:
        return text
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{hostport}"))
