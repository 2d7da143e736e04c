"""UpstreamBackend: a model served by another OpenAI-compatible server (vLLM, SGLang,
llama-server, another lmserve), behind the backend contract, so every lmserve dialect can
serve it.

The upstream renders templates and parses tool calls and reasoning itself: a request goes out
as one streaming /chat/completions (messages) or /completions (prompt) POST, and each SSE
chunk comes back as a list of choice steps (`lmserve.upstream.wire`). Closing a generation
closes the upstream response, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from lmserve.core.backend import (
    BackendGeneration,
    CacheFlush,
    ChoiceStep,
    EngineStats,
    Failed,
    Finished,
    FinishReason,
    LoadState,
    ModelCard,
    PreparedPrompt,
    UpstreamStats,
    WeightsFacts,
)
from lmserve.core.errors import ErrorKind, LmserveError, draining_error, invalid, unsupported
from lmserve.core.events import Usage
from lmserve.core.lora import AdapterSet, LoraSelection
from lmserve.core.observe import RequestTiming, note_generation
from lmserve.core.quota import charge_tokens, metered
from lmserve.core.request import GenerationRequest
from lmserve.upstream import wire

__all__ = ["UpstreamBackend", "UpstreamGeneration", "UpstreamSettings"]

log = logging.getLogger("lmserve.upstream")

# Upper bounds (seconds) of the time-to-first-token histogram that stats() counts.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class UpstreamSettings:
    url: str  # the upstream's OpenAI base, e.g. http://host:8000/v1
    model: str | None = None  # the model name the upstream serves; None: the served name
    api_key: str | None = None  # sent as a bearer token
    connect_timeout: float = 10.0
    read_timeout: float = 600.0  # the longest wait for the next bytes of a response
    max_connections: int = 256  # kept-alive connections in the pool, requests at once
    flavor: str | None = None  # "lmserve", "vllm", "llamacpp", ...; None: from /models


class _Counters:
    """Upstream request counters, read by stats() (and so /metrics)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0

    def ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i in range(bisect.bisect_left(TTFT_BUCKETS, seconds), len(TTFT_BUCKETS)):
            self.ttft_buckets[i] += 1

    def error(self, kind: ErrorKind) -> None:
        self.errors[kind.value] = self.errors.get(kind.value, 0) + 1

    def tokens(self) -> dict[str, float]:
        """The token counters, under the engine's names, so they read the same for every
        backend."""
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens}

    def traffic(self) -> UpstreamStats:
        return UpstreamStats(
            requests=self.requests, errors=dict(self.errors),
            ttft_buckets=tuple(zip(TTFT_BUCKETS, self.ttft_buckets, strict=True)),
            ttft_sum=self.ttft_sum, ttft_count=self.ttft_count,
            duration_sum=self.duration_sum, duration_count=self.duration_count)


class UpstreamBackend:
    """One model of an OpenAI-compatible upstream server. See the module docstring."""

    kind = "upstream"

    def __init__(self, name: str, settings: UpstreamSettings, aliases: Sequence[str] = (), *,
                 transport: Any = None) -> None:
        """`transport`: an httpx transport for both clients (tests: httpx.MockTransport)."""
        if not settings.url.startswith(("http://", "https://")):
            raise ValueError(f"upstream '{name}': the URL must start with http:// or "
                             f"https://, got {settings.url!r}")
        self.name = name
        self.aliases = tuple(aliases)
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.model = settings.model or name
        self.created = int(time.time())
        self._state = LoadState.PENDING
        self._error: str | None = None
        self._info: wire.UpstreamModel | None = None
        self._flavor = settings.flavor or ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._sync: httpx.Client | None = None
        self._sync_lock = threading.Lock()
        self._tokenizer: bool | None = None  # the upstream has /tokenize; None: not probed
        # its /tokenize takes a chat (messages); None: not tried yet
        self._chat_tokenizer: bool | None = None
        self._running: dict[str, UpstreamGeneration] = {}
        self._draining = False
        self._transport = transport
        self.counters = _Counters()

    # -- HTTP clients -----------------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.api_key}"} \
            if self.settings.api_key else {}

    def _timeout(self) -> httpx.Timeout:
        s = self.settings
        return httpx.Timeout(connect=s.connect_timeout, read=s.read_timeout,
                             write=s.read_timeout, pool=s.read_timeout)

    def http(self) -> httpx.AsyncClient:
        """The shared, pooled client (HTTP/1.1 keep-alive), made on the event loop."""
        if self._client is None:
            limit = self.settings.max_connections
            self._client = httpx.AsyncClient(
                timeout=self._timeout(), headers=self.headers, trust_env=False,
                transport=self._transport,
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit,
                                    keepalive_expiry=30.0))
        return self._client

    def _sync_client(self) -> httpx.Client:
        with self._sync_lock:
            if self._sync is None:
                self._sync = httpx.Client(timeout=self._timeout(), headers=self.headers,
                                          trust_env=False, transport=self._transport)
            return self._sync

    # -- lifecycle --------------------------------------------------------------------------
    def load(self, loop: asyncio.AbstractEventLoop,
             progress: Callable[[float], None] | None = None) -> None:
        """Blocking (the loader thread): check that the upstream serves the model, learn its
        context size, and whether it tokenizes."""
        self._loop = loop
        self._state = LoadState.LOADING
        try:
            client = self._sync_client()
            response = client.get(wire.join_url(self.url, "models"))
            if response.status_code >= 400:
                raise wire.error_from_response(response.status_code, response.content,
                                               response.headers)
            self._info = wire.find_model(response.json(), self.model)
            self._flavor = self.settings.flavor or self._info.flavor
            if self._info.created:
                self.created = self._info.created
            self._tokenizer = self._probe_tokenizer(client)
            self._state = LoadState.READY
            if progress:
                progress(1.0)
        except Exception as exc:
            reason = exc.message if isinstance(exc, LmserveError) else \
                f"{type(exc).__name__}: {exc}"
            self._state, self._error = LoadState.FAILED, reason
            log.error("upstream model %s at %s is not usable: %s", self.name, self.url, reason)
            raise

    def _probe_tokenizer(self, client: httpx.Client) -> bool:
        try:
            response = client.post(wire.join_url(wire.server_root(self.url), "tokenize"),
                                   json=wire.tokenize_body("a", True, self.model))
            if response.status_code == 200:
                wire.tokens_of(response.json())
                return True
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            pass
        return False

    def close(self) -> None:
        """Abort running requests and close the connection pools (from any thread)."""
        for generation in list(self._running.values()):
            self._on_loop(generation.close)
        if self._sync is not None:
            self._sync.close()
        client, self._client = self._client, None
        if client is None:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            running.create_task(client.aclose())
        elif loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(5)
            except Exception:  # the loop is shutting down: the sockets close with it
                pass

    def _on_loop(self, fn: Callable[[], None]) -> None:
        try:
            asyncio.get_running_loop()
            fn()
        except RuntimeError:
            if self._loop is not None and self._loop.is_running():
                self._loop.call_soon_threadsafe(fn)

    @property
    def ready(self) -> bool:
        return self._state == LoadState.READY

    @property
    def healthy(self) -> bool:
        return self._state != LoadState.FAILED

    # -- the card ---------------------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        info, s = self._info, self.settings
        weights = None
        if info is not None and any(v is not None for v in (
                info.architecture, info.n_ctx_train, info.n_params, info.n_vocab)):
            weights = WeightsFacts(architecture=info.architecture, n_ctx_train=info.n_ctx_train,
                                   n_params=info.n_params, n_vocab=info.n_vocab,
                                   size_bytes=info.size_bytes)
        n_ctx = info.n_ctx if info is not None else 0
        return ModelCard(
            name=self.name, aliases=self.aliases, kind=self.kind, source=self.url,
            state=self._state, progress=1.0 if self.ready else 0.0, error=self._error,
            created=self.created, n_ctx=n_ctx, parallel=s.max_connections, max_queue=0,
            embedding_ctx=n_ctx,
            chat_template="",  # the upstream renders chats with a template of its own
            vision=True,  # images (and audio) are passed on; the upstream accepts or refuses
            audio=True,  # them
            weights=weights, upstream_model=self.model,
            settings={"url": self.url, "model": self.model, "flavor": self._flavor,
                      "connect_timeout": s.connect_timeout, "read_timeout": s.read_timeout,
                      "max_connections": s.max_connections,
                      "api_key": "<set>" if s.api_key else None,
                      "tokenize": bool(self._tokenizer)})

    def stats(self) -> EngineStats | None:
        running = len(self._running)
        return EngineStats(alive=self._state != LoadState.FAILED, error=self._error,
                           active_requests=running, running=running, waiting=0,
                           counters=self.counters.tokens(), upstream=self.counters.traffic())

    def require_ready(self) -> ModelCard:
        if self._state == LoadState.FAILED:
            raise LmserveError(ErrorKind.UPSTREAM, f"model '{self.name}': the upstream at "
                               f"{self.url} could not be used: {self._error}")
        if self._state != LoadState.READY:
            raise LmserveError(ErrorKind.LOADING, f"model '{self.name}' is connecting to its "
                               "upstream", code="model_loading", retry_after=2.0)
        return self.card

    # -- prompts ----------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """The upstream renders and tokenizes: the prompt stays as the request has it."""
        self.require_ready()
        wire.check_request(request, self._flavor)
        tokens = list(request.prompt_tokens) if request.prompt_tokens is not None else []
        text = request.prompt if request.messages is None else None
        return PreparedPrompt(tokens, text)

    async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
        """Media URLs are passed on: the upstream fetches them under its own policy."""
        return request

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Through the upstream's /tokenize (llama-server, vLLM, lmserve); a blocking call."""
        self.require_ready()
        if not self._tokenizer:
            raise self._no_tokenizer("counting tokens")
        response = self._post_sync("tokenize", wire.tokenize_body(text, add_special,
                                                                 self.model))
        try:
            return wire.tokens_of(response)
        except (ValueError, TypeError, KeyError):
            raise LmserveError(ErrorKind.UPSTREAM, "the upstream's /tokenize answer has no "
                               "token list") from None

    def detokenize(self, tokens: Sequence[int]) -> str:
        self.require_ready()
        if not self._tokenizer:
            raise self._no_tokenizer("turning token ids into text")
        response = self._post_sync("detokenize", {"model": self.model, "tokens": list(tokens)})
        text = response.get("content", response.get("prompt")) \
            if isinstance(response, dict) else None
        if not isinstance(text, str):
            raise LmserveError(ErrorKind.UPSTREAM, "the upstream's /detokenize answer has no "
                               "text")
        return text

    def _no_tokenizer(self, what: str) -> LmserveError:
        return LmserveError(ErrorKind.UNSUPPORTED, f"{what} needs the upstream's tokenizer, "
                            f"and the upstream of '{self.name}' ({self.url}) offers no "
                            "/tokenize endpoint", code="unsupported_by_upstream")

    def _post_sync(self, path: str, body: dict[str, Any]) -> Any:
        url = wire.join_url(wire.server_root(self.url), path)
        try:
            response = self._sync_client().post(url, json=body)
        except httpx.HTTPError as exc:
            raise connection_error(exc, self.url) from None
        if response.status_code >= 400:
            raise wire.error_from_response(response.status_code, response.content,
                                           response.headers)
        return response.json()

    def adapters(self, model: str | None, selection: LoraSelection | None = None
                 ) -> AdapterSet:
        if selection is not None and selection.refs:
            raise unsupported(selection.param, "LoRA adapters cannot be selected on an "
                              "upstream model")
        return ()

    # -- generation -------------------------------------------------------------------------
    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None, *,
              parse: bool | None = None) -> BackendGeneration:
        """Validate now (refusals before any response starts) and send the request: on the
        running event loop it goes out at once; the answer is read by a task of its own.
        The request's meter (core.quota) applies; the prompt's tokens are charged where the
        prepared prompt knows them, the output from the upstream's usage."""
        return metered(request, len(prepared.tokens) if prepared is not None else 0,
                       lambda admitted: self._start(admitted, parse))

    def _start(self, request: GenerationRequest, parse: bool | None) -> UpstreamGeneration:
        self.require_ready()
        if self._draining:
            raise draining_error()
        wire.check_request(request, self._flavor)
        if request.n < 1:
            raise invalid("n must be at least 1", param="n")
        chat = request.messages is not None
        body = wire.request_body(request, self.model, self._flavor)
        path = "chat/completions" if chat else "completions"
        request_id = request.request_id or f"upstream-{uuid.uuid4().hex}"
        if request_id in self._running:
            raise invalid(f"a request with the id '{request_id}' is already running",
                          param="request_id")
        generation = UpstreamGeneration(self, request_id, wire.join_url(self.url, path), body,
                                        n=request.n, chat=chat,
                                        parse=chat if parse is None else parse,
                                        continuous=wire.continuous_usage(request, self._flavor),
                                        summed=self._flavor == wire.LMSERVE,
                                        stop_ids=request.stop_token_ids)
        self._running[request_id] = generation
        generation.begin()
        note_generation(self.name, generation.timing)
        return generation

    async def abort(self, request_id: str) -> bool:
        generation = self._running.get(request_id)
        if generation is None:
            return False
        generation.close()
        return True

    async def prompt_tokens(self, request: GenerationRequest) -> list[int] | None:
        """The prompt's token ids as the upstream renders and tokenizes it, for a route that
        needs its length before it sends the request (core.backend.counted): a chat through
        vLLM's chat form of /tokenize (messages, tools, add_generation_prompt,
        continue_final_message; lmserve's too), or llama-server's /apply-template and then
        /tokenize; a text prompt through /tokenize. None where the upstream cannot tell (no
        /tokenize, no chat form of it, or a refusal: the request itself then meets the
        upstream's own checks). Not in the contract."""
        self.require_ready()
        if request.prompt_tokens is not None:
            return list(request.prompt_tokens)
        if not self._tokenizer or (request.messages is not None and
                                   self._chat_tokenizer is False):
            return None
        try:
            if request.messages is None:
                body = wire.tokenize_body(request.prompt or "", True, self.model)
            elif self._flavor == wire.LLAMACPP:
                rendered = await self._post("apply-template", wire.template_body(request))
                prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
                if not isinstance(prompt, str):
                    raise ValueError("no prompt")
                body = {**wire.tokenize_body(prompt, True, self.model), "parse_special": True}
            else:
                body = wire.chat_tokenize_body(request, self.model)
            tokens = wire.tokens_of(await self._post("tokenize", body))
        except (LmserveError, httpx.HTTPError, ValueError, TypeError, KeyError) as exc:
            log.debug("the upstream of %s did not count a prompt: %s", self.name, exc)
            if request.messages is not None and _not_offered(exc):
                self._chat_tokenizer = False  # not asked again
            return None
        if not tokens:  # llama-server answers a /tokenize without its `content` with []
            if request.messages is not None:
                self._chat_tokenizer = False
            return None
        if request.messages is not None:
            self._chat_tokenizer = True
        return tokens

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        """POST to a route beside the OpenAI base (/tokenize, /apply-template); its JSON."""
        url = wire.join_url(wire.server_root(self.url), path)
        response = await self.http().post(url, json=body)
        if response.status_code >= 400:
            raise wire.error_from_response(response.status_code, response.content,
                                           response.headers)
        return response.json()

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt's length as the upstream counts it (template and all): its /tokenize
        (prompt_tokens), else the usage of a one-token generation of the same request. Not
        in the contract: for a dialect that must count a prompt (Anthropic's count_tokens;
        core.backend.prompt_count)."""
        tokens = await self.prompt_tokens(request)
        if tokens:
            return len(tokens)
        probe = dataclasses.replace(request, max_tokens=1, n=1, request_id=None,
                                    logprobs=None, stop=[])
        generation = self._start(probe, parse=False)  # a probe: not charged to the caller
        try:
            async for steps in generation:
                for step in steps:
                    step.raise_failure()
                    if step.usage is not None and step.usage.prompt_tokens:
                        return step.usage.prompt_tokens
        finally:
            generation.close()
        raise LmserveError(ErrorKind.UNSUPPORTED, f"the upstream of '{self.name}' reports no "
                           "prompt token counts", code="unsupported_by_upstream")

    async def flush_cache(self) -> CacheFlush | None:
        return None  # the upstream's cache is its own

    async def release_session(self, session: str) -> bool:
        return False  # nothing is pinned here; the upstream's cache is its own

    # -- shutdown ---------------------------------------------------------------------------
    def drain(self) -> None:
        self._draining = True

    @property
    def busy(self) -> int:
        return len(self._running)

    async def fail_all(self, error: LmserveError) -> None:
        for generation in list(self._running.values()):
            generation.fail_now(error)

    def _finished(self, generation: UpstreamGeneration) -> None:
        if self._running.get(generation.request_id) is generation:
            del self._running[generation.request_id]

    # -- embeddings -------------------------------------------------------------------------
    async def embed(self, inputs: Sequence[Sequence[int] | str], adapters: AdapterSet = ()
                    ) -> list[np.ndarray]:
        self.require_ready()
        if adapters:
            raise unsupported("lora", "LoRA adapters cannot be selected on an upstream model")
        items: list[Any] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                items.append(item)
            elif self._flavor in wire.TOKEN_FLAVORS:
                items.append([int(t) for t in item])
            else:
                raise unsupported("input", f"input[{i}]: this upstream is not known to take "
                                  "token ids; send text")
        try:
            response = await self.http().post(wire.join_url(self.url, "embeddings"),
                                                 json={"model": self.model, "input": items})
        except httpx.HTTPError as exc:
            raise connection_error(exc, self.url) from None
        if response.status_code >= 400:
            raise wire.error_from_response(response.status_code, response.content,
                                           response.headers)
        try:
            answer = response.json()
            data = sorted(answer["data"], key=lambda d: d.get("index", 0))
            vectors = [np.asarray(d["embedding"], dtype=np.float32) for d in data]
        except (ValueError, TypeError, KeyError, AttributeError):
            raise LmserveError(ErrorKind.UPSTREAM, "the upstream's /embeddings answer has no "
                               "float vectors") from None
        if len(vectors) != len(items):
            raise LmserveError(ErrorKind.UPSTREAM, f"the upstream returned {len(vectors)} "
                               f"embeddings for {len(items)} inputs")
        charge_tokens(_embedded_tokens(answer, items))  # the key's tokens a minute
        return vectors


def _embedded_tokens(answer: Any, items: Sequence[Any]) -> int:
    """The input tokens of an embeddings exchange: the upstream's usage.prompt_tokens when it
    reports them, else the token ids sent (text it did not count cannot be counted here)."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
        return reported
    return sum(len(item) for item in items if isinstance(item, list))


def _not_offered(exc: Exception) -> bool:
    """A failed count that says the upstream has no chat form of /tokenize (a refused
    parameter, a missing route, an answer without tokens), not that this chat is bad."""
    if isinstance(exc, LmserveError):
        return exc.kind in (ErrorKind.UNSUPPORTED, ErrorKind.NOT_FOUND,
                            ErrorKind.MODEL_NOT_FOUND)
    return isinstance(exc, (ValueError, TypeError, KeyError))


def connection_error(exc: httpx.HTTPError, url: str) -> LmserveError:
    """A failed exchange with the upstream: 504 when it timed out, 502 otherwise."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return LmserveError(ErrorKind.UPSTREAM_TIMEOUT, f"the upstream at {url} timed out "
                            f"({type(exc).__name__}: {detail})", code="upstream_timeout")
    if isinstance(exc, httpx.ConnectError):
        return LmserveError(ErrorKind.UPSTREAM, f"the upstream at {url} cannot be reached: "
                            f"{detail}", code="upstream_unreachable")
    return LmserveError(ErrorKind.UPSTREAM, f"the exchange with the upstream at {url} "
                        f"failed ({type(exc).__name__}: {detail})", code="upstream_error")


_END = None


class UpstreamGeneration:
    """One streamed upstream request. A task reads the response and queues choice steps;
    iterating takes them from the queue. `await ready()` waits for the upstream's answer to
    the request itself (its status), so a refusal can still become a real HTTP status.
    `close()` cancels the task, which closes the response: the upstream aborts the request."""

    def __init__(self, backend: UpstreamBackend, request_id: str, url: str,
                 body: dict[str, Any], *, n: int, chat: bool, parse: bool,
                 continuous: bool = False, summed: bool = False,
                 stop_ids: Sequence[int] = ()) -> None:
        self.backend = backend
        self._request_id = request_id
        self.url = url
        self.body = body
        self.n = n
        self.reader = wire.StreamReader(n, chat=chat, parse=parse, continuous=continuous,
                                        summed=summed, stop_ids=stop_ids)
        self._queue: asyncio.Queue[list[ChoiceStep] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._accepted: asyncio.Future[LmserveError | None] | None = None
        self._closed = False
        self._delivered = False  # every choice's terminal is queued
        self._ran = False  # the reader task started
        # time.monotonic() of sending, the first content, the end (for the request's timing)
        self.sent_at = time.monotonic()
        self.first_at: float | None = None
        self.ended_at: float | None = None

    @property
    def request_id(self) -> str:
        return self._request_id

    def timing(self) -> RequestTiming:
        """The request as this side sees it: no queue of its own (the upstream's queue is
        part of its time to the first token); tokens from the upstream's usage."""
        usage = self.reader.usage
        return RequestTiming(
            queued_at=self.sent_at, admitted_at=self.sent_at, first_token_at=self.first_at,
            finished_at=self.ended_at,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            output_tokens=usage.completion_tokens if usage is not None else 0,
            cached_tokens=usage.cached_tokens if usage is not None else 0)

    @property
    def finished(self) -> bool:
        """Every choice has ended (read or not), or the generation was closed."""
        return self._closed or self.reader.ended

    @property
    def closed(self) -> bool:
        return self._closed

    def begin(self) -> None:
        """Send now if an event loop runs here (else on the first iteration)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._begin(loop)

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._accepted = loop.create_future()
        if self._closed:  # closed before it was sent: nothing goes out
            self._accepted.set_result(None)
            self._put(self._cancelled_steps())
            self._queue.put_nowait(_END)
            self.backend._finished(self)
            return
        self._task = loop.create_task(self._run(), name=f"upstream-{self._request_id}")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before it ran never reached _run's finally: end it here."""
        if self._ran or self._queue is None:
            return
        self._accept(None)
        self._put(self._cancelled_steps())
        self._queue.put_nowait(_END)
        self.backend._finished(self)

    async def ready(self) -> None:
        """Wait until the upstream has answered the request (status and headers); raise its
        refusal (or the connection's failure) as an LmserveError with the mapped kind."""
        self._begin(asyncio.get_running_loop())
        assert self._accepted is not None
        error = await asyncio.shield(self._accepted)
        if error is not None:
            raise error

    async def __aiter__(self) -> AsyncIterator[list[ChoiceStep]]:
        self._begin(asyncio.get_running_loop())
        assert self._queue is not None
        try:
            while True:
                steps = await self._queue.get()
                if steps is _END:
                    return
                yield steps
        finally:
            self.close()

    def close(self) -> None:
        """Abort unless every choice has ended (call on the event loop's thread)."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is not None and not task.done() and not self._delivered:
            task.cancel()

    # -- the reader task --
    def _put(self, steps: list[ChoiceStep]) -> None:
        if not steps:
            return
        assert self._queue is not None
        self._queue.put_nowait(steps)
        if self.reader.ended:
            # The rest of the body ([DONE]) is read before the iteration ends, so the
            # connection is back in the pool before the client can send its next request.
            self._delivered = True

    def _accept(self, error: LmserveError | None) -> None:
        if self._accepted is not None and not self._accepted.done():
            self._accepted.set_result(error)

    def _fail(self, error: LmserveError) -> None:
        self.backend.counters.error(error.kind)
        self._accept(error)
        self._put(self.reader.fail(Failed.of(error)))

    def fail_now(self, error: LmserveError) -> None:
        """End every unfinished choice with this error and stop reading (the drain timeout)."""
        if self._queue is not None:
            self._put(self.reader.fail(Failed.of(error)))
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _cancelled_steps(self) -> list[ChoiceStep]:
        out = []
        counts = {c.index: c.steps for c in self.reader.choices.values()}
        for index, choice in self.reader.choices.items():
            if not choice.ended:
                choice.ended = True
                usage = self.reader.usage
                out.append(ChoiceStep(index, end=Finished(
                    FinishReason.CANCELLED, _counted(usage, counts[index]))))
        return out

    async def _run(self) -> None:
        self._ran = True
        backend, counters = self.backend, self.backend.counters
        counters.requests += 1
        started = time.perf_counter()
        first: float | None = None
        response: httpx.Response | None = None
        decoder = wire.SSEDecoder()
        try:
            client = backend.http()
            request = client.build_request("POST", self.url, json=self.body,
                                           headers={"X-Request-Id": self._request_id,
                                                    "Accept": "text/event-stream",
                                                    "Accept-Encoding": "identity"})
            response = await client.send(request, stream=True)
            if response.status_code >= 400:
                content = await response.aread()
                self._fail(wire.error_from_response(response.status_code, content,
                                                    response.headers))
                return
            self._accept(None)
            # identity encoding: the raw bytes need no decoding (a body already read, as a
            # test transport gives, is only iterable decoded)
            chunks = response.aiter_bytes() if response.is_stream_consumed \
                else response.aiter_raw()
            async for chunk in chunks:
                if self._delivered:
                    continue  # drain to the end, so the connection is kept alive
                for payload in decoder.feed(chunk):
                    steps = self.reader.data(payload)
                    if first is None and self.reader.content_seen:
                        first = time.perf_counter()
                        counters.ttft(first - started)
                        self.first_at = time.monotonic()
                    self._put(steps)
            if not self._delivered:
                for payload in decoder.flush():
                    self._put(self.reader.data(payload))
                self._put(self.reader.end_of_stream())
        except asyncio.CancelledError:
            self._accept(None)
            self._put(self._cancelled_steps())
            raise
        except httpx.HTTPError as exc:
            self._fail(connection_error(exc, backend.url))
        except Exception as exc:  # a bug here must still end the choices
            log.exception("upstream request %s failed", self._request_id)
            self._fail(LmserveError(ErrorKind.UPSTREAM, f"reading the upstream's answer "
                                    f"failed: {type(exc).__name__}: {exc}"))
        finally:
            self._accept(None)
            if not self._delivered and self._queue is not None:
                self._put(self._cancelled_steps())
            usage = self.reader.usage
            if usage is not None:
                counters.prompt_tokens += usage.prompt_tokens
                counters.generated_tokens += usage.completion_tokens
            counters.duration_sum += time.perf_counter() - started
            counters.duration_count += 1
            self.ended_at = time.monotonic()
            backend._finished(self)
            try:
                if response is not None:
                    await response.aclose()  # read to the end: back to the pool; else closed
            finally:
                if self._queue is not None:
                    self._queue.put_nowait(_END)


def _counted(usage: Usage | None, steps: int) -> Usage:
    """A cancelled choice's usage: the chunks it received count as its tokens."""
    if usage is None:
        return Usage(0, steps)
    return Usage(usage.prompt_tokens, steps, usage.cached_tokens)
