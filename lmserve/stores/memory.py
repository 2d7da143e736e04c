"""In-process backend: dicts in insertion order (oldest first). For tests, or storage off."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lmserve.stores.base import ResponseStore, SessionStore, Store, StreamStore
from lmserve.stores.records import (
    JSON,
    Clock,
    ConflictError,
    Frame,
    ItemPage,
    NotFoundError,
    PageQuery,
    ResponseRecord,
    Retention,
    RetentionPolicy,
    Session,
    SessionInfo,
    StreamInfo,
    StreamRetention,
    StreamState,
    check_id,
    check_messages,
    copy_json,
    is_expired,
    page_items,
)

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    expires_at: float | None
    extra: list[JSON] = field(default_factory=list)  # stream frames or session messages


class _Table(Generic[T]):
    """Entries oldest first, with expiry checked on access and caps applied on write."""

    def __init__(self, retention: Retention, clock: Clock) -> None:
        self.retention = retention
        self.clock = clock
        self.entries: dict[str, _Entry[T]] = {}

    def live(self, key: str) -> _Entry[T] | None:
        entry = self.entries.get(key)
        if entry is not None and is_expired(entry.expires_at, self.clock()):
            del self.entries[key]
            return None
        return entry

    def delete(self, key: str) -> bool:
        found = self.live(key) is not None
        self.entries.pop(key, None)
        return found

    def touch(self, key: str, entry: _Entry[T]) -> None:
        """Make `key` the newest entry (least recently used goes first)."""
        self.entries.pop(key, None)
        self.entries[key] = entry

    def evict(self) -> list[str]:
        now = self.clock()
        gone = [k for k, e in self.entries.items() if is_expired(e.expires_at, now)]
        cap = self.retention.max_entries
        if cap is not None:
            expired = set(gone)
            alive = [k for k in self.entries if k not in expired]
            gone += alive[:max(0, len(alive) - cap)]
        for key in gone:
            del self.entries[key]
        return gone


class MemoryStreams(StreamStore):
    def __init__(self, retention: StreamRetention, clock: Clock,
                 poll_interval: float | None = None) -> None:
        super().__init__(poll_interval)  # only expiry goes unsignalled here
        self._retention = retention
        self._table: _Table[StreamInfo] = _Table(retention, clock)

    def _open(self, stream_id: str) -> _Entry[StreamInfo]:
        entry = self._table.live(stream_id)
        if entry is None:
            raise NotFoundError("Stream", stream_id)
        return entry

    async def create(self, stream_id: str, meta: JSON | None = None) -> StreamInfo:
        check_id(stream_id, "stream")
        if self._table.live(stream_id) is not None:
            raise ConflictError(f"Stream '{stream_id}' already exists.", "already_exists")
        now = self._table.clock()
        info = StreamInfo(stream_id, StreamState.OPEN, copy_json(meta or {}), now, None, 0)
        self._table.entries[stream_id] = _Entry(info, self._retention.open_expires_at(now))
        await self.purge()
        return info

    async def append(self, stream_id: str, event: str, data: str) -> int:
        entry = self._open(stream_id)
        if entry.value.finished:
            raise ConflictError(f"Stream '{stream_id}' is finished.", "stream_finished")
        frame_id = entry.value.last_id + 1
        entry.extra.append({"event": str(event), "data": str(data)})
        entry.value = dataclasses.replace(entry.value, last_id=frame_id)
        self.notifier.notify(stream_id)
        return frame_id

    async def read(self, stream_id: str, after: int = 0, limit: int | None = None) -> list[Frame]:
        entry = self._table.live(stream_id)
        if entry is None:
            return []
        after = max(after, 0)
        stop = None if limit is None else after + limit
        return [Frame(after + 1 + i, f["event"], f["data"])
                for i, f in enumerate(entry.extra[after:stop])]

    async def finish(self, stream_id: str, state: StreamState = StreamState.COMPLETED) -> bool:
        if state is StreamState.OPEN:
            raise ValueError("finish needs a terminal state")
        entry = self._open(stream_id)
        if entry.value.finished:
            return False
        now = self._table.clock()
        entry.value = dataclasses.replace(entry.value, state=state, finished_at=now)
        entry.expires_at = self._retention.expires_at(now)
        self.notifier.notify(stream_id)
        return True

    async def get(self, stream_id: str) -> StreamInfo | None:
        entry = self._table.live(stream_id)
        return None if entry is None else dataclasses.replace(entry.value,
                                                              meta=copy_json(entry.value.meta))

    async def delete(self, stream_id: str) -> bool:
        found = self._table.delete(stream_id)
        self.notifier.notify(stream_id)
        return found

    async def purge(self) -> int:
        gone = self._table.evict()
        for stream_id in gone:
            self.notifier.notify(stream_id)
        return len(gone)


class MemoryResponses(ResponseStore):
    def __init__(self, retention: Retention, clock: Clock) -> None:
        self._table: _Table[ResponseRecord] = _Table(retention, clock)

    async def put(self, record: ResponseRecord) -> None:
        check_id(record.id, "response")
        stored = ResponseRecord.from_json(copy_json(record.to_json()))
        entry = self._table.live(record.id)
        if entry is not None:
            entry.value = stored
            return
        expires = self._table.retention.expires_at(self._table.clock())
        self._table.entries[record.id] = _Entry(stored, expires)
        await self.purge()

    async def get(self, response_id: str) -> ResponseRecord | None:
        entry = self._table.live(response_id)
        return None if entry is None else ResponseRecord.from_json(copy_json(entry.value.to_json()))

    async def delete(self, response_id: str) -> bool:
        return self._table.delete(response_id)

    async def input_items(self, response_id: str, query: PageQuery = PageQuery()) -> ItemPage:
        entry = self._table.live(response_id)
        if entry is None:
            raise NotFoundError("Response", response_id)
        return page_items(copy_json(entry.value.input_items), query)

    async def purge(self) -> int:
        return len(self._table.evict())


class MemorySessions(SessionStore):
    def __init__(self, retention: Retention, clock: Clock) -> None:
        self._table: _Table[SessionInfo] = _Table(retention, clock)

    async def create(self, session_id: str, *, model: str, system: str | None = None,
                     metadata: JSON | None = None) -> Session:
        check_id(session_id, "session")
        if self._table.live(session_id) is not None:
            raise ConflictError(f"Session '{session_id}' already exists.", "already_exists")
        now = self._table.clock()
        info = SessionInfo(session_id, model, system, copy_json(metadata or {}), now, now, 0)
        self._table.entries[session_id] = _Entry(info, self._table.retention.expires_at(now))
        await self.purge()
        return Session(**dataclasses.asdict(info))

    async def get(self, session_id: str, *, messages: bool = True) -> Session | None:
        entry = self._table.live(session_id)
        if entry is None:
            return None
        transcript = copy_json(entry.extra) if messages else []
        return Session(**dataclasses.asdict(entry.value), messages=transcript)

    async def append(self, session_id: str, messages: Sequence[JSON]) -> SessionInfo:
        batch = check_messages(messages)
        entry = self._table.live(session_id)
        if entry is None:
            raise NotFoundError("Session", session_id)
        now = self._table.clock()
        entry.extra.extend(batch)
        entry.value = dataclasses.replace(entry.value, updated_at=now,
                                          message_count=len(entry.extra))
        entry.expires_at = self._table.retention.expires_at(now)
        self._table.touch(session_id, entry)
        return entry.value

    async def delete(self, session_id: str) -> bool:
        return self._table.delete(session_id)

    async def _recent(self, limit: int) -> list[SessionInfo]:
        await self.purge()
        return [e.value for e in reversed(self._table.entries.values())][:limit]

    async def purge(self) -> int:
        return len(self._table.evict())


def open_memory(retention: RetentionPolicy, clock: Clock,
                poll_interval: float | None = None) -> Store:
    async def close() -> None:
        return None

    return Store("memory", "memory",
                 streams=MemoryStreams(retention.streams, clock, poll_interval),
                 responses=MemoryResponses(retention.responses, clock),
                 sessions=MemorySessions(retention.sessions, clock), closer=close)
