"""The backend contract: everything a dialect may use of a model, and nothing more.

A dialect (OpenAI, Anthropic, Ollama, SGLang, oLLM, native) sees a model only as a
`ModelBackend`: it prepares a neutral `GenerationRequest`, starts it, iterates the
`BackendGeneration` and encodes what comes out. What comes out is already parsed: each
`ChoiceStep` carries the step's chat events (text per channel, tool call start / delta / end)
and, on a choice's last step, exactly one terminal event, `Finished` or `Failed`. A `Failed`
keeps the engine's `ErrorKind`, so a client gets the right status (before the first byte) or
the dialect's in-stream error (after it).

`lmserve.service.ModelService` implements the contract over the llama.cpp engine;
`lmserve.upstream.UpstreamBackend` over another OpenAI-compatible server. Tests use a small
scripted backend (`tests/unit/chat_service.py`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    FINISH_ERROR,
    ChatEvent,
    TextDelta,
    TokenLogprob,
    TokenOutput,
    Usage,
)
from lmserve.core.images import MediaSpan
from lmserve.core.lora import AdapterSet, LoraSelection, LoraSpec
from lmserve.core.request import GenerationRequest

__all__ = [
    "BackendGeneration", "ChoiceStep", "EngineStats", "Failed", "FinishReason", "Finished",
    "LoadState", "ModelBackend", "ModelCard", "PreparedPrompt", "Terminal", "UpstreamStats",
    "WeightsFacts", "WrappedGeneration", "choice_step", "with_media",
]


class LoadState(enum.StrEnum):
    PENDING = "pending"  # listed, not loading yet
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class FinishReason(enum.StrEnum):
    """Why a choice ended normally. The values are the engine's finish strings."""

    STOP = "stop"  # end of generation, a stop string or a stop token
    LENGTH = "length"  # max_tokens, or the end of the context
    CANCELLED = "cancelled"  # aborted: the client left, or the request was cancelled


@dataclass(frozen=True, slots=True)
class Finished:
    """A choice ended normally."""

    reason: FinishReason
    usage: Usage
    stop_match: str | None = None  # the stop string or token text that ended it


@dataclass(frozen=True, slots=True)
class Failed:
    """A choice ended in an error; `kind` decides the status a dialect reports."""

    kind: ErrorKind
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None
    usage: Usage | None = None  # what was generated before the failure, where known

    def error(self) -> LmserveError:
        return LmserveError(self.kind, self.message, param=self.param, code=self.code,
                            retry_after=self.retry_after)

    @classmethod
    def of(cls, exc: LmserveError, usage: Usage | None = None) -> Failed:
        return cls(exc.kind, exc.message, exc.param, exc.code, exc.retry_after, usage)


Terminal = Finished | Failed


@dataclass(slots=True)
class ChoiceStep:
    """What one choice produced in one step: its raw text, that text parsed into chat events,
    its tokens (and logprobs when asked for), and on its last step the terminal event.

    The attribute names the encoders read (`text`, `finish_reason`, `usage`, `finished`, ...)
    match the engine's `TokenOutput`, so a step is encoded the same way whichever backend
    produced it."""

    index: int  # which of the n choices
    text: str = ""  # the raw generated text of this step (what a completion returns)
    events: list[ChatEvent] = field(default_factory=list)  # the text, parsed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    end: Terminal | None = None
    # The choice's usage so far (the prompt, this choice's tokens) where the backend learns it
    # as it goes rather than from token_ids: an upstream's running counts, asked for by
    # GenerationRequest.continuous_usage. The terminal's usage replaces it.
    running: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def failed(self) -> Failed | None:
        return self.end if isinstance(self.end, Failed) else None

    @property
    def finish_reason(self) -> str | None:
        """The finish reason as the engine names it ("stop", "length", "cancelled", "error")."""
        if self.end is None:
            return None
        return self.end.reason.value if isinstance(self.end, Finished) else FINISH_ERROR

    @property
    def usage(self) -> Usage | None:
        return self.end.usage if self.end is not None else None

    @property
    def stop_match(self) -> str | None:
        return self.end.stop_match if isinstance(self.end, Finished) else None

    @property
    def error(self) -> str | None:
        return self.end.message if isinstance(self.end, Failed) else None

    def raise_failure(self) -> None:
        """Raise the choice's error, with its kind, if it failed."""
        if isinstance(self.end, Failed):
            raise self.end.error()


def choice_step(out: TokenOutput, events: list[ChatEvent] | None = None) -> ChoiceStep:
    """An engine output as a step; `events` None: the text as it is, on the output channel."""
    if events is None:
        events = [TextDelta(CHANNEL_OUTPUT, out.text)] if out.text else []
    end: Terminal | None = None
    if out.finish_reason == FINISH_ERROR:
        end = Failed(out.error_kind or ErrorKind.INTERNAL, out.error or "generation failed",
                     usage=out.usage)
    elif out.finish_reason is not None:
        end = Finished(FinishReason(out.finish_reason), out.usage or Usage(), out.stop_match)
    return ChoiceStep(out.index, out.text, events, out.token_ids, out.logprobs,
                      out.prompt_logprobs, end)


async def with_media(backend: ModelBackend, request: GenerationRequest) -> GenerationRequest:
    """The request ready for `backend.prepare`: its media URLs fetched, if it has any."""
    if request.messages and any(image.remote for m in request.messages for image in m.images):
        return await backend.fetch_media(request)
    return request


async def counted(backend: ModelBackend, request: GenerationRequest,
                  prepared: PreparedPrompt) -> PreparedPrompt:
    """`prepared` with the prompt's token ids, for a route that needs the prompt's length
    before it starts the generation (a context check, fitting max_tokens). A backend that
    leaves rendering and tokenizing to another server (an upstream) prepares none; where it
    offers `prompt_tokens(request)` (outside the contract) that server is asked, and where it
    cannot tell (None) the tokens stay empty and the route's check is left to it."""
    ask = None if prepared.tokens else getattr(backend, "prompt_tokens", None)
    if ask is None:
        return prepared
    tokens = await ask(request)
    return prepared if not tokens else replace(prepared, tokens=list(tokens))


async def prompt_count(backend: ModelBackend, request: GenerationRequest,
                       prepared: PreparedPrompt) -> int:
    """The prompt's length in tokens: the prepared tokens', or, where the backend prepared
    none, its own count (`count_tokens(request)`, outside the contract: an upstream's
    /tokenize, else a one-token generation); 0 where neither tells it."""
    count = None if prepared.tokens else getattr(backend, "count_tokens", None)
    if count is None:
        return len(prepared.tokens)
    return int(await count(request))


@dataclass
class PreparedPrompt:
    """A request rendered for one model: the prompt tokens and what the turn's plan decided."""

    tokens: list[int]
    text: str | None
    grammar: str | None = None  # forced tool call or response_format (see chat.turn)
    tool_format: str | None = None  # the tool-call format to parse; None: no calls parsed
    dropped_messages: int = 0  # oldest messages dropped to fit the context (chat.overflow)
    truncating: bool = False  # the chat was fitted under context_overflow "truncate"
    markers: frozenset[int] = frozenset()  # control tokens the chat parser reads, rendered
    media: tuple[MediaSpan, ...] = ()  # images: their stand-in positions in tokens


@runtime_checkable
class BackendGeneration(Protocol):
    """A started request: iterate it for lists of choice steps (one list per step); every
    choice ends with exactly one terminal event. Closing it early aborts the request."""

    @property
    def request_id(self) -> str: ...

    @property
    def finished(self) -> bool:
        """The backend is done with it: every choice ended, or it was closed (read or not)."""
        ...

    async def ready(self) -> None:
        """Wait until the backend has accepted the request, and raise its refusal (with its
        kind) if it did not. A local engine has accepted it once `start` returned; an upstream
        accepts when it answers with its status. Streaming routes await this before their
        first byte, so a refusal is a real status there too."""
        ...

    def __aiter__(self) -> AsyncIterator[list[ChoiceStep]]: ...

    def close(self) -> None: ...


class WrappedGeneration:
    """A BackendGeneration around another (`inner`): its id, state and acceptance are the
    inner one's; a subclass watches the steps (`__aiter__`) or the close."""

    def __init__(self, inner: BackendGeneration) -> None:
        self.inner = inner

    @property
    def request_id(self) -> str:
        return self.inner.request_id

    @property
    def finished(self) -> bool:
        return self.inner.finished

    async def ready(self) -> None:
        await self.inner.ready()

    def __aiter__(self) -> AsyncIterator[list[ChoiceStep]]:
        return self.inner.__aiter__()

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class WeightsFacts:
    """Facts about the loaded weights (None where a backend cannot know them)."""

    architecture: str | None = None
    n_ctx_train: int | None = None
    n_params: int | None = None
    n_embd: int | None = None
    n_vocab: int | None = None
    size_bytes: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)  # the GGUF's scalar metadata


@dataclass(frozen=True)
class PlacementFacts:
    """Where a loaded model's weights and KV cache live (llama.cpp backend)."""

    where: str = "cpu"  # the weights: cpu | gpu | split (some layers on the GPU)
    gpu_layers: int = 0  # offloaded layers, the output layer counted (n_layer + 1: all)
    n_layer: int = 0
    reason: str = ""  # why that many layers (engine.hardware.offload)
    weights_gpu_bytes: int = 0
    kv_where: str = "cpu"  # the KV cache: cpu | gpu (with the offloaded layers)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    kv_bytes: int = 0  # the KV cache's size, all streams
    flash_attn: str = "auto"
    # the devices offloaded layers go to, "NAME (DESCRIPTION)": GPUs, and RPC servers' devices
    # ("RPC0 (host:port)", counted as "gpu" above)
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamStats:
    """An upstream backend's traffic (lmserve.upstream), for /metrics."""

    requests: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)  # failed requests by ErrorKind
    ttft_buckets: tuple[tuple[float, int], ...] = ()  # (upper bound in s, requests at or under)
    ttft_sum: float = 0.0
    ttft_count: int = 0
    duration_sum: float = 0.0
    duration_count: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A running engine's counters, for info routes and /metrics."""

    alive: bool = True
    error: str | None = None
    active_requests: int = 0  # running or queued, as admitted
    running: int = 0
    waiting: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_tokens: int = 0
    counters: Mapping[str, float] = field(default_factory=dict)  # step counters, by name
    phases: Mapping[str, float] = field(default_factory=dict)  # seconds per step phase
    last_step_sequences: int = 0
    disk_cache: Mapping[str, int] | None = None  # hits, tokens_loaded, saves, ..., bytes
    ram_cache: Mapping[str, int] | None = None  # the same for the RAM tier (--cache-ram)
    adapter_steps: Mapping[str, int] = field(default_factory=dict)  # adapters -> steps
    adapter_switches: int = 0
    upstream: UpstreamStats | None = None  # a backend that relays to another server


_STATUS = {LoadState.PENDING: "unloaded", LoadState.LOADING: "loading",
           LoadState.READY: "loaded", LoadState.FAILED: "failed"}


@dataclass(frozen=True)
class CacheFlush:
    """What `flush_cache` dropped: the cached prefixes in memory and the saved states of the
    disk cache (--disk-cache). `disk_kept`: why the disk cache was left as it was (None: it
    was cleared, or there is none)."""

    prefixes: int
    disk_states: int = 0
    disk_kept: str | None = None


@dataclass(frozen=True)
class ModelCard:
    """What a dialect may know about a model: names, load state, context and limits,
    template capabilities, adapters. A snapshot: ask the backend again for a fresh one."""

    name: str
    aliases: tuple[str, ...]
    kind: str  # "llama.cpp" or "upstream"
    source: str  # the GGUF path, or the upstream's URL
    state: LoadState
    progress: float = 0.0
    error: str | None = None
    created: int = 0
    n_ctx: int = 0  # one sequence's room; 0 until known
    parallel: int = 1
    max_queue: int = 0
    step_tokens: int = 0
    threads: int | None = None
    embedding_ctx: int = 0
    chat_template: str | None = None  # the template's source; None: no template
    reasoning_tags: tuple[str, str] | None = None
    vision: bool = False
    audio: bool = False  # a projector with an audio encoder (audio input)
    loras: tuple[LoraSpec, ...] = ()
    kv_layout: str | None = None  # "split" | "shared" once loaded (llama.cpp)
    weights: WeightsFacts | None = None  # once loaded (llama.cpp) or reported (upstream)
    placement: PlacementFacts | None = None  # once loaded (llama.cpp)
    settings: Mapping[str, Any] = field(default_factory=dict)  # engine settings, for info
    upstream_model: str | None = None  # the model name the upstream serves
    memory_bytes: int | None = None  # estimated bytes once loaded (a library model)
    # The model's default generation parameters (its config section, Ollama's params layer);
    # a request's own values, and a resource's defaults, win.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None  # unix time an idle loaded model unloads; None: never

    @property
    def ready(self) -> bool:
        return self.state == LoadState.READY

    @property
    def status(self) -> str:
        """The load state in the model library's words: unloaded, loading, loaded, failed."""
        return _STATUS[self.state]

    @property
    def has_template(self) -> bool:
        return self.chat_template is not None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@runtime_checkable
class ModelBackend(Protocol):
    """All a dialect may use of a model. See the module docstring."""

    name: str
    aliases: tuple[str, ...]

    @property
    def card(self) -> ModelCard: ...

    # -- lifecycle: the registry's, not a dialect's -------------------------------------------
    def load(self, loop: asyncio.AbstractEventLoop,
             progress: Callable[[float], None] | None = None) -> None:
        """Blocking (a loader thread runs it): make the model ready, or raise."""
        ...

    def close(self) -> None: ...

    # -- shutdown (the registry's): refuse new work, wait for it, cut what is left ----------
    def drain(self) -> None:
        """From now on refuse new generations (503 ErrorKind.DRAINING); running ones go on."""
        ...

    @property
    def busy(self) -> int:
        """Generations started and not yet done."""
        ...

    async def fail_all(self, error: LmserveError) -> None:
        """End every running generation with this error, inside its own stream."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    def require_ready(self) -> ModelCard:
        """The card of a model that can run requests; else an error (503 while loading)."""
        ...

    def prepare(self, request: GenerationRequest) -> PreparedPrompt: ...

    async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its media URLs (images, audio clips) downloaded and inline, under
        the model's media policy (refusals are 400s naming the input's field); the request as
        it is where the backend takes no media or passes URLs on. Preparation is synchronous,
        so routes await this first (`with_media`)."""
        ...

    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None, *,
              parse: bool | None = None) -> BackendGeneration:
        """Validate and submit now, so every refusal happens before a response starts.
        `parse`: run the chat parser on the output (default: for chat requests)."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    async def embed(self, inputs: Sequence[Sequence[int] | str], adapters: AdapterSet = ()
                    ) -> list[np.ndarray]:
        """One vector per input (token ids, or text the backend tokenizes itself)."""
        ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def adapters(self, model: str | None, selection: LoraSelection | None = None
                 ) -> AdapterSet: ...

    async def flush_cache(self) -> CacheFlush | None:
        """Drop the idle prefix cache, in memory and on disk; None (nothing done) while
        requests run or wait."""
        ...

    async def release_session(self, session: str) -> bool:
        """A session (`GenerationRequest.session`) ended: its KV is no longer pinned, and a
        turn of it still running will not pin it. False: nothing was pinned for it."""
        ...

    def stats(self) -> EngineStats | None: ...
