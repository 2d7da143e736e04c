"""The async interface every backend implements: streams, responses and sessions."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType

from lmserve.core.errors import invalid
from lmserve.stores.cluster import Cluster
from lmserve.stores.notify import Notifier, wait_for_change
from lmserve.stores.records import (
    JSON,
    Frame,
    ItemPage,
    PageQuery,
    ResponseRecord,
    Session,
    SessionInfo,
    StreamInfo,
    StreamState,
)


class StreamStore(abc.ABC):
    """Frames of resumable SSE streams: one producer appends, any number of readers follow.

    A reader that saw frame N resumes with `read(id, after=N)` / `follow(id, after=N)` and gets
    exactly the frames after N. Finished streams stay readable for the retention ttl.

    Backends call `notifier.notify(stream_id)` whenever a stream changes in this process;
    `poll_interval` (None: never) bounds how late a change made elsewhere is noticed.
    """

    def __init__(self, poll_interval: float | None) -> None:
        self.notifier = Notifier()
        self.poll_interval = poll_interval

    @abc.abstractmethod
    async def create(self, stream_id: str, meta: JSON | None = None) -> StreamInfo:
        """Start an open stream; ConflictError if the id is taken."""

    @abc.abstractmethod
    async def append(self, stream_id: str, event: str, data: str) -> int:
        """Add a frame and return its id; NotFoundError if unknown, ConflictError if finished."""

    @abc.abstractmethod
    async def read(self, stream_id: str, after: int = 0, limit: int | None = None) -> list[Frame]:
        """Frames with id > after, oldest first (at most `limit`); [] for an unknown stream."""

    @abc.abstractmethod
    async def finish(self, stream_id: str, state: StreamState = StreamState.COMPLETED) -> bool:
        """Close the stream; False if it was already finished (the first state wins)."""

    @abc.abstractmethod
    async def get(self, stream_id: str) -> StreamInfo | None:
        """The stream's state, or None when unknown, deleted or expired."""

    @abc.abstractmethod
    async def delete(self, stream_id: str) -> bool:
        """Drop the stream and its frames; False if there was none."""

    async def wait(self, stream_id: str, after: int, timeout: float | None) -> bool:
        """Return True as soon as a frame after `after` exists, the stream is finished or it
        is gone; False when `timeout` seconds pass first (None: no timeout)."""
        await self._before_wait()
        return await wait_for_change(self.notifier, stream_id,
                                     lambda: self.has_news(stream_id, after), timeout,
                                     self.poll_interval)

    async def _before_wait(self) -> None:  # noqa: B027 (an optional hook, no-op by default)
        """A backend's hook to start listening for changes made by other processes."""

    @abc.abstractmethod
    async def purge(self) -> int:
        """Delete expired and over-cap streams now; returns how many were removed."""

    async def has_news(self, stream_id: str, after: int) -> bool:
        """What `wait` waits for: a frame after `after`, a finished stream, or no stream."""
        info = await self.get(stream_id)
        return info is None or info.finished or info.last_id > after

    async def follow(self, stream_id: str, after: int = 0, *,
                     heartbeat: float | None = None) -> AsyncIterator[Frame | None]:
        """Yield every frame after `after` until the stream is finished and drained, or gone.

        With a heartbeat, None is yielded whenever that many seconds pass without a frame,
        so the caller can send an SSE comment.
        """
        while True:
            frames = await self.read(stream_id, after)
            for frame in frames:
                yield frame
                after = frame.id
            if frames:
                continue
            info = await self.get(stream_id)
            if info is None or (info.finished and info.last_id <= after):
                return
            if not await self.wait(stream_id, after, heartbeat):
                yield None


class ResponseStore(abc.ABC):
    """Stored OpenAI Responses objects (see ResponseRecord for the chain contract)."""

    @abc.abstractmethod
    async def put(self, record: ResponseRecord) -> None:
        """Insert, or replace a record with the same id; a replacement keeps its retention
        position and expiry (e.g. an in_progress response later stored as completed)."""

    @abc.abstractmethod
    async def get(self, response_id: str) -> ResponseRecord | None:
        """The record, or None when unknown, deleted or expired."""

    @abc.abstractmethod
    async def delete(self, response_id: str) -> bool:
        """Drop one record; records chained from it keep working. False if there was none."""

    @abc.abstractmethod
    async def input_items(self, response_id: str, query: PageQuery = PageQuery()) -> ItemPage:
        """A page of the record's input items; NotFoundError for an unknown response."""

    @abc.abstractmethod
    async def purge(self) -> int:
        """Delete expired and over-cap records now; returns how many were removed."""

    async def chain(self, response_id: str, max_depth: int | None = None) -> list[ResponseRecord]:
        """The record and its stored ancestors, oldest first, following previous_response_id
        until a link is missing (deleted or evicted) or `max_depth` records were collected."""
        records: list[ResponseRecord] = []
        seen: set[str] = set()
        next_id: str | None = response_id
        while next_id is not None and next_id not in seen:
            if max_depth is not None and len(records) >= max_depth:
                break
            record = await self.get(next_id)
            if record is None:
                break
            records.append(record)
            seen.add(next_id)
            next_id = record.previous_response_id
        records.reverse()
        return records


class SessionStore(abc.ABC):
    """Chat sessions with an ordered transcript."""

    @abc.abstractmethod
    async def create(self, session_id: str, *, model: str, system: str | None = None,
                     metadata: JSON | None = None) -> Session:
        """Start an empty session; ConflictError if the id is taken."""

    @abc.abstractmethod
    async def get(self, session_id: str, *, messages: bool = True) -> Session | None:
        """The session (with its transcript unless messages=False), or None."""

    @abc.abstractmethod
    async def append(self, session_id: str, messages: Sequence[JSON]) -> SessionInfo:
        """Add messages at the end, all or nothing, never interleaved with another append;
        NotFoundError for an unknown session."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Drop the session and its transcript; False if there was none."""

    async def recent(self, limit: int = 100) -> list[SessionInfo]:
        """Up to `limit` sessions, most recently active first."""
        if not isinstance(limit, int) or limit < 1:
            raise invalid("limit must be a positive integer", param="limit")
        return await self._recent(limit)

    @abc.abstractmethod
    async def _recent(self, limit: int) -> list[SessionInfo]: ...

    @abc.abstractmethod
    async def purge(self) -> int:
        """Delete expired and over-cap sessions now; returns how many were removed."""


class Store:
    """One backend's three stores. Close it when done (or use `async with`)."""

    def __init__(self, kind: str, location: str, *, streams: StreamStore,
                 responses: ResponseStore, sessions: SessionStore,
                 closer: Callable[[], Awaitable[None]], cluster: Cluster | None = None) -> None:
        self.kind = kind  # "memory", "sqlite" or "redis"
        self.location = location  # where the data lives, without credentials
        self.streams = streams
        self.responses = responses
        self.sessions = sessions
        self.cluster = cluster or Cluster()  # the replicas sharing this store
        self._closer = closer
        self._closed = False

    async def purge(self) -> int:
        """Apply retention to every kind now (backends also do it as they write)."""
        return (await self.streams.purge() + await self.responses.purge()
                + await self.sessions.purge())

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.cluster.leave()
            await self._closer()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Store({self.kind}, {self.location})"
