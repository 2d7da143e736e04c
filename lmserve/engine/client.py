"""The asyncio side of an engine: submit a request, iterate its outputs, abort it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmserve.core.errors import ErrorKind, LmserveError, draining_error
from lmserve.core.events import FINISH_LENGTH, FINISH_STOP, TokenOutput
from lmserve.engine.loop import EngineThread
from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest


class _Stream:
    __slots__ = ("queue", "remaining")

    def __init__(self, n: int) -> None:
        self.queue: asyncio.Queue[list[TokenOutput]] = asyncio.Queue()
        self.remaining = n


class EngineClient:
    """Bridges the engine thread and the event loop with one loop wake-up per engine step."""

    def __init__(self, core_factory: Callable[[Callable[[StepOutputs], None]], EngineCore[Any]], *,
                 loop: asyncio.AbstractEventLoop, max_queue: int,
                 max_queued_tokens: int | None = None, name: str = "engine") -> None:
        self._loop = loop
        self._thread = EngineThread(core_factory, self._on_step, name=name)
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens  # prompt tokens waiting; None: no cap
        self.active = 0
        self.submitted_tokens = 0  # prompt tokens of every request submitted (cumulative)
        self.draining = False  # the server is shutting down: submit() refuses
        self._live: set[str] = set()  # ids of the requests submitted and not yet done

    @property
    def core(self) -> EngineCore[Any]:
        return self._thread.core

    @property
    def alive(self) -> bool:
        return self._thread.alive

    @property
    def error(self) -> str | None:
        return self._thread.error

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def _on_step(self, outputs: StepOutputs) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: StepOutputs) -> None:  # event loop
        for request, items in outputs:
            stream = request.handle
            if isinstance(stream, _Stream):
                stream.queue.put_nowait(items)

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens of the requests submitted and not yet admitted: what this side sent,
        less what the engine's wait queue has let go (each counter has one writer)."""
        return self.submitted_tokens - self.core.waiting.left_tokens

    def submit(self, request: EngineRequest) -> Generation:
        """Admit a request now (capacity and health are checked before anything is sent)."""
        if self.draining:
            raise draining_error()
        capacity = self.core.max_running + self.max_queue
        if self.active >= capacity:
            raise LmserveError(ErrorKind.OVERLOADED,
                               f"the server is at capacity ({self.active} requests running or "
                               "queued); retry shortly", code="server_overloaded", retry_after=1.0)
        queued, cap = self.queued_tokens, self.max_queued_tokens
        if cap is not None and queued and queued + len(request.prompt_tokens) > cap:
            raise LmserveError(ErrorKind.OVERLOADED,
                               f"the server is at capacity ({queued} prompt tokens queued, "
                               f"at most {cap}); retry shortly", code="server_overloaded",
                               retry_after=1.0)
        if not self.alive:
            raise LmserveError(ErrorKind.INTERNAL, f"the engine is not running ({self.error})")
        stream = _Stream(request.n)
        request.handle = stream
        self.active += 1
        self.submitted_tokens += len(request.prompt_tokens)
        self._live.add(request.request_id)
        self._thread.submit(request)
        return Generation(self, request, stream)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._live

    def _done(self, generation: Generation) -> None:
        self.active -= 1
        self._live.discard(generation.request.request_id)
        if generation.stream.remaining > 0:  # the consumer went away (disconnect, error)
            self._thread.abort(generation.request.request_id)

    def abort(self, request_id: str) -> None:
        self._thread.abort(request_id)

    def stop_choice(self, request_id: str, index: int) -> None:
        """End one choice of a running request as a stop, between steps (not waited for)."""
        self._thread.call(lambda core: core.stop_choice(request_id, index))

    async def fail_all(self, message: str, kind: ErrorKind) -> None:
        """End every running and queued request with this error (the drain timeout)."""
        if self.alive:
            await self.call(lambda core: core.fail_all(message, kind))

    async def call(self, fn: Callable[[EngineCore[Any]], Any]) -> Any:
        """Run fn on the engine thread between steps and return its result."""
        reply = self._thread.call(fn)
        ok, value = await asyncio.to_thread(reply.get)
        if not ok:
            raise value
        return value


class Generation:
    """A submitted request: iterate its step outputs; closing it early aborts it."""

    def __init__(self, client: EngineClient, request: EngineRequest, stream: _Stream) -> None:
        self.client = client
        self.request = request
        self.stream = stream
        self._closed = False
        # Called with the first choice's ids once it stops or reaches its length (not when
        # cancelled or failed): the service remembers the answer (engine.turn_memory).
        self.on_done: Callable[[list[int]], None] | None = None
        self._first: list[int] = []

    async def __aiter__(self) -> AsyncIterator[list[TokenOutput]]:
        try:
            while self.stream.remaining > 0:
                items = await self.stream.queue.get()
                self.stream.remaining -= sum(1 for item in items if item.finished)
                if self.on_done is not None:
                    self._note(items)
                yield items
        finally:
            self.close()

    def _note(self, items: list[TokenOutput]) -> None:
        for item in items:
            if item.index != 0:
                continue
            self._first.extend(item.token_ids)
            if item.finish_reason in (FINISH_STOP, FINISH_LENGTH) and self.on_done is not None:
                self.on_done(self._first)

    @property
    def closed(self) -> bool:
        return self._closed

    def stop_choice(self, index: int) -> None:
        """End choice `index` as if it had stopped by itself (finish_reason stop)."""
        if not self._closed:
            self.client.stop_choice(self.request.request_id, index)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client._done(self)

    def __del__(self) -> None:
        # A response that never started iterating (the client left before the first byte)
        # drops its Generation unclosed: abort it here rather than run to max_tokens.
        if not self._closed:
            try:
                self.client._loop.call_soon_threadsafe(self.close)
            except RuntimeError:  # the loop is closed: the engine is going away too
                pass
