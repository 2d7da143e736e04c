"""The engine thread: owns the llama.cpp context, drains its inbox, runs steps."""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest

log = logging.getLogger("lmserve.engine")

_STOP = object()


class EngineThread:
    """Runs EngineCore.step() in a dedicated thread; other threads talk to it via the inbox."""

    def __init__(self, core_factory: Callable[[Callable[[StepOutputs], None]], EngineCore[Any]],
                 sink: Callable[[StepOutputs], None], *, name: str = "engine") -> None:
        self.core = core_factory(sink)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"lmserve-{name}", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[EngineCore[Any]], Any]) -> queue.SimpleQueue[Any]:
        """Run fn(core) on the engine thread between steps; the result arrives on the queue."""
        reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inbox.put(("call", (fn, reply)))
        return reply

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            stalled = False
            while True:
                # Block while idle; while busy, only take what has already arrived
                # (or wait a moment if the last step could not run anything).
                if not self._drain(block=not self.core.has_work, stalled=stalled):
                    return
                stalled = self.core.has_work and not self.core.step()
        except Exception as exc:  # the engine must never die silently
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("engine thread crashed:\n%s", traceback.format_exc())
            try:
                self.core.fail_all(f"engine failure: {self.error}")
            except Exception:
                log.exception("could not fail pending requests")

    def _drain(self, *, block: bool, stalled: bool = False) -> bool:
        timeout = 0.005 if stalled and not block else None
        while True:
            try:
                item = self._inbox.get(block=block or timeout is not None, timeout=timeout)
            except queue.Empty:
                return True
            block, timeout = False, None
            if item is _STOP:
                self.core.fail_all("the server is shutting down")
                return False
            kind, payload = item
            if kind == "add":
                self.core.add(payload)
            elif kind == "abort":
                self.core.abort(payload)
            elif kind == "call":
                fn, reply = payload
                try:
                    reply.put((True, fn(self.core)))
                except Exception as exc:
                    reply.put((False, exc))
