"""Running one prompt, alone or as a session turn: collect it or stream it as oLLM events, store
a session's turn before the final body or event goes out, and keep one turn at a time per
session."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from lmserve.core.backend import BackendGeneration
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import FINISH_CANCELLED
from lmserve.dialects.ollm import encoder
from lmserve.http.streaming import sse
from lmserve.stores import SessionStore


@dataclass
class SessionTurn:
    """A turn in progress. `owned`: a consumer that always releases it holds it (the request
    handler, or a stream body that has started); a stream response that never started is
    live only until the engine is done with its generation."""

    generation: BackendGeneration | None = None
    owned: bool = False
    done: bool = False

    @property
    def live(self) -> bool:
        if self.done:
            return False
        return self.owned or self.generation is None or not _finished(self.generation)


def _finished(generation: BackendGeneration) -> bool:
    """Whether the backend is done with a generation, read or not."""
    return generation.finished


class Turns:
    """One turn at a time per session, so every turn sees the whole transcript before it."""

    def __init__(self) -> None:
        self._by_session: dict[str, SessionTurn] = {}

    def claim(self, session_id: str) -> SessionTurn:
        current = self._by_session.get(session_id)
        if current is not None and current.live:
            raise LmserveError(ErrorKind.OVERLOADED, f"session '{session_id}' is still answering "
                               "a prompt; send the next one when it has finished",
                               code="session_busy", retry_after=1.0)
        turn = self._by_session[session_id] = SessionTurn()
        return turn

    def release(self, session_id: str, turn: SessionTurn) -> None:
        turn.done = True
        if self._by_session.get(session_id) is turn:
            del self._by_session[session_id]


@dataclass
class PromptJob:
    """A submitted prompt and where its turn goes (a session, or nowhere)."""

    generation: BackendGeneration
    model: str
    prompt: str
    started: float  # monotonic time of submission
    status: str | None = None  # the stream's opening status message (None: quiet)
    truncated_messages: int = 0  # the oldest transcript messages dropped to fit the context
    sessions: SessionStore | None = None
    session_id: str | None = None
    on_end: Callable[[], None] = lambda: None  # called once the stream is over
    turn: encoder.Turn = field(init=False)

    def __post_init__(self) -> None:
        self.turn = encoder.Turn(self.model)

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    async def collect(self) -> dict[str, Any]:
        try:
            async for steps in self.generation:
                for step in steps:
                    self.turn.add(step, self._elapsed())
                    step.raise_failure()  # with its kind: the status is the failure's
        finally:
            self.generation.close()
        return await self._finish()

    async def events(self, on_start: Callable[[], None] = lambda: None) -> AsyncIterator[bytes]:
        on_start()
        try:
            if self.status:
                yield _frame(encoder.status_event(self.status))
            async for steps in self.generation:
                for step in steps:
                    delta = self.turn.add(step, self._elapsed())
                    if delta:
                        yield _frame(encoder.text_event(delta))
                    step.raise_failure()  # the error event follows what was generated
            yield _frame(encoder.complete_event(await self._finish()))
        except LmserveError as exc:  # the stream has started: the error travels inside it
            yield _frame(encoder.error_event(exc))
        finally:
            self.generation.close()  # a disconnect lands here too, and cancels the sequence
            self.on_end()

    async def _finish(self) -> dict[str, Any]:
        """Check the outcome, store the session turn (durably, before anyone is told), and
        return the final body."""
        if self.turn.finish_reason == FINISH_CANCELLED:
            raise LmserveError(ErrorKind.INTERNAL, "the generation was cancelled")
        if self.sessions is not None and self.session_id is not None:
            await self.sessions.append(self.session_id, self.turn.stored(self.prompt, time.time()))
        return self.turn.body(self._elapsed(), self.session_id)


def _frame(event: encoder.Event) -> bytes:
    name, data = event
    return sse(data, event=name)
