"""Pure translation: the backend's choice steps -> OpenAI JSON bodies and stream chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from lmserve.core.backend import ChoiceStep, Failed
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    ParsedTurn,
    TokenLogprob,
    Usage,
)
from lmserve.core.observe import with_request_id
from lmserve.core.quota import RateLimited
from lmserve.dialects.openai.chat_events import assistant_message, chat_finish_reason
from lmserve.dialects.openai.logprobs import chat_logprobs, choice_completion_logprobs

SYSTEM_FINGERPRINT = "lmserve"

_ERROR_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorKind.UNSUPPORTED: "invalid_request_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.MODEL_NOT_FOUND: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.PAYLOAD_TOO_LARGE: "invalid_request_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.OVERLOADED: "rate_limit_error",
    ErrorKind.LOADING: "service_unavailable_error",
    ErrorKind.CAPACITY: "service_unavailable_error",  # the KV cache is full: retry shortly
    ErrorKind.DRAINING: "service_unavailable_error",  # shutting down: retry on another replica
    ErrorKind.UNAVAILABLE: "service_unavailable_error",  # the store is down: retry shortly
    ErrorKind.UPSTREAM: "server_error",
    ErrorKind.UPSTREAM_TIMEOUT: "server_error",
    ErrorKind.INTERNAL: "server_error",
}


def error_type(kind: ErrorKind) -> str:
    """OpenAI's error `type` for a kind of failure (the status comes from the kind)."""
    return _ERROR_TYPES.get(kind, "server_error")


def _error_type(exc: LmserveError) -> str:
    """A key's rate limit names the limit, as OpenAI's do (requests or tokens)."""
    return exc.dimension if isinstance(exc, RateLimited) else error_type(exc.kind)


def error_body(exc: LmserveError) -> dict[str, Any]:
    return with_request_id({"error": {"message": exc.message, "type": _error_type(exc),
                                      "param": exc.param, "code": exc.code or exc.kind.value}})


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows stop and length; a cancelled or failed sequence never reaches a body."""
    if reason in (FINISH_LENGTH,):
        return "length"
    if reason in (FINISH_CANCELLED, FINISH_ERROR):
        return reason
    return None if reason is None else "stop"


def stop_reason(match: str | None, stop_ids: Collection[int] = ()) -> str | int | None:
    """vLLM's `stop_reason` beside finish_reason: the stop string that ended the choice, or
    the id of the stop_token_ids token that did; None otherwise (EOS, length, ...)."""
    if match is not None and match.isdigit() and int(match) in stop_ids:
        return int(match)
    return match


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def sum_usage(parts: list[Usage]) -> Usage:
    """n choices share one prompt: count it once, add every choice's completion."""
    if not parts:
        return Usage()
    return Usage(prompt_tokens=parts[0].prompt_tokens,
                 completion_tokens=sum(u.completion_tokens for u in parts),
                 cached_tokens=parts[0].cached_tokens)


def total_usage(groups: list[list[Usage]]) -> Usage:
    """Several prompts (completions with a list of prompts): each group is one prompt."""
    per_prompt = [sum_usage(g) for g in groups]
    return Usage(prompt_tokens=sum(u.prompt_tokens for u in per_prompt),
                 completion_tokens=sum(u.completion_tokens for u in per_prompt),
                 cached_tokens=sum(u.cached_tokens for u in per_prompt))


@dataclass
class Choice:
    index: int
    text: str = ""  # the raw text (what a completion returns)
    turn: ParsedTurn = field(default_factory=ParsedTurn)  # the text, parsed (a chat message)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string (or stop token id) matched
    logprobs: list[TokenLogprob] | None = None  # None: not asked for
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Collected:
    """A whole (non-streamed) generation gathered from choice steps."""

    choices: dict[int, Choice] = field(default_factory=dict)
    usage_groups: dict[int, list[Usage]] = field(default_factory=dict)  # per prompt
    failure: Failed | None = None  # the first choice that failed: the response is its error
    stop_ids: frozenset[int] = frozenset()  # the request's stop_token_ids (for stop_reason)

    def add(self, step: ChoiceStep, index: int, group: int = 0) -> None:
        choice = self.choices.setdefault(index, Choice(index))
        choice.text += step.text
        choice.turn.extend(step.events)
        if step.logprobs is not None:
            choice.logprobs = choice.logprobs or []
            choice.logprobs.extend(step.logprobs)
        if step.prompt_logprobs is not None:
            choice.prompt_logprobs = step.prompt_logprobs
        if step.finished:
            choice.finish_reason = finish_reason(step.finish_reason)
            choice.stop_reason = stop_reason(step.stop_match, self.stop_ids)
            if step.usage is not None:
                self.usage_groups.setdefault(group, []).append(step.usage)
            if step.failed is not None and self.failure is None:
                self.failure = step.failed

    @property
    def usage(self) -> Usage:
        return total_usage(list(self.usage_groups.values()))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_completion(model: str, collected: Collected, usage: Usage) -> dict[str, Any]:
    """Each choice's message is its parsed turn (reasoning, answer text, tool calls)."""
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [_chat_choice(c, c.turn)
                    for c in sorted(collected.choices.values(), key=lambda c: c.index)],
        "usage": usage_body(usage),
    }


def _chat_choice(choice: Choice, turn: ParsedTurn) -> dict[str, Any]:
    return {"index": choice.index, "message": assistant_message(turn),
            "logprobs": chat_logprobs(choice.logprobs),
            "finish_reason": chat_finish_reason(choice.finish_reason, bool(turn.tool_calls)),
            "stop_reason": choice.stop_reason}


def text_completion(model: str, collected: Collected, usage: Usage) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
        "model": model, "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": c.index, "text": c.text,
                     "logprobs": choice_completion_logprobs(c.prompt_logprobs, c.logprobs, c.text),
                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    for c in sorted(collected.choices.values(), key=lambda c: c.index)],
        "usage": usage_body(usage),
    }


class RunningUsage:
    """vLLM's `stream_options.continuous_usage_stats`: the usage so far, which every chunk
    carries. The prompt counts once per prompt (its n choices share it); a choice's tokens
    count as its steps bring them (their token ids, or the backend's running count where it
    has no ids: an upstream's), and its final usage replaces that count when it ends.

    `prompts`: each prompt's length where it is known before the generation; 0 where only
    the backend's counts will tell it (an upstream renders the chat): `known` is then False
    until the first step of that prompt brings it."""

    def __init__(self, prompts: list[int], n: int = 1) -> None:
        self._prompts = list(prompts)
        self._told = [count == 0 for count in prompts]  # the backend's counts say it
        self._n = n
        self._completion: dict[int, int] = {}  # per choice, over every prompt's choices

    @property
    def known(self) -> bool:
        return not any(self._told) or all(self._prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompts)

    def learn_prompt(self, index: int, step: ChoiceStep) -> None:
        """The prompt's length from a step's counts, where only they can tell it."""
        job = index // self._n
        counted = step.usage or step.running
        if self._told[job] and counted is not None and counted.prompt_tokens:
            self._prompts[job] = counted.prompt_tokens

    def add(self, index: int, step: ChoiceStep) -> None:
        self.learn_prompt(index, step)
        if step.usage is not None:
            self._completion[index] = step.usage.completion_tokens
        elif step.running is not None:
            self._completion[index] = step.running.completion_tokens
        else:
            self._completion[index] = self._completion.get(index, 0) + len(step.token_ids)

    def body(self) -> dict[str, int]:
        completion = sum(self._completion.values())
        prompt = self.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class ChunkEncoder:
    """Builds stream chunks for chat (chat.completion.chunk) or completions (text_completion)."""

    def __init__(self, model: str, *, chat: bool, include_usage: bool,
                 running: RunningUsage | None = None, stop_ids: Collection[int] = ()) -> None:
        self.chat = chat
        self.stop_ids = frozenset(stop_ids)
        self.include_usage = include_usage
        self.running = running
        self._base = {"id": new_id("chatcmpl" if chat else "cmpl"),
                      "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": model,
                      "system_fingerprint": SYSTEM_FINGERPRINT}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {**self._base, "choices": choices}
        if self.running is not None:
            chunk["usage"] = self.running.body()
        elif self.include_usage:
            chunk["usage"] = None
        return chunk

    def choice_chunk(self, index: int, delta: dict[str, Any], reason: str | None,
                     logprobs: dict[str, Any] | None = None, stop: str | None = None
                     ) -> dict[str, Any]:
        """A chat chunk with a prepared delta and a wire finish reason (`stop`: the stop
        string that ended the choice, on its last chunk)."""
        return self._chunk([self._ended({"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}, stop)])

    def _ended(self, choice: dict[str, Any], stop: str | None) -> dict[str, Any]:
        """The last chunk of a choice says which stop ended it (vLLM's stop_reason)."""
        if choice["finish_reason"] is not None:
            choice["stop_reason"] = stop_reason(stop, self.stop_ids)
        return choice

    def role(self, index: int) -> dict[str, Any]:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def delta(self, index: int, text: str, reason: str | None,
              logprobs: dict[str, Any] | None = None, stop: str | None = None
              ) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text else {}
            return self._chunk([self._ended({"index": index, "delta": delta,
                                             "logprobs": logprobs,
                                             "finish_reason": finish_reason(reason)}, stop)])
        return self._chunk([self._ended({"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish_reason(reason)}, stop)])

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage_body(usage)}
