"""Resumable stream frames in SQLite: a row per stream, a row per frame."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from lmserve.stores.base import StreamStore
from lmserve.stores.records import (
    JSON,
    Clock,
    ConflictError,
    Frame,
    NotFoundError,
    StreamInfo,
    StreamRetention,
    StreamState,
    check_id,
    copy_json,
    dumps,
)
from lmserve.stores.sqlite_db import LIVE, SqliteDatabase, delete_row, evict

_INFO = "SELECT id, state, meta, created_at, finished_at, last_id FROM streams"


def _info(row: tuple[Any, ...]) -> StreamInfo:
    ident, state, meta, created_at, finished_at, last_id = row
    return StreamInfo(ident, StreamState(state), json.loads(meta), created_at, finished_at,
                      last_id)


def _live_info(conn: sqlite3.Connection, stream_id: str, now: float) -> StreamInfo | None:
    row = conn.execute(f"{_INFO} WHERE id = ? AND {LIVE}", (stream_id, now)).fetchone()
    return None if row is None else _info(row)


def _open_info(conn: sqlite3.Connection, stream_id: str, now: float) -> StreamInfo:
    info = _live_info(conn, stream_id, now)
    if info is None:
        raise NotFoundError("Stream", stream_id)
    return info


class SqliteStreams(StreamStore):
    """Followers in this process are woken at once; writers in another process sharing the
    file are noticed by a poll every `poll_interval` seconds."""

    def __init__(self, db: SqliteDatabase, retention: StreamRetention, clock: Clock,
                 poll_interval: float = 0.5) -> None:
        super().__init__(poll_interval)
        self._db = db
        self._retention = retention
        self._clock = clock

    async def create(self, stream_id: str, meta: JSON | None = None) -> StreamInfo:
        check_id(stream_id, "stream")
        now = self._clock()
        info = StreamInfo(stream_id, StreamState.OPEN, copy_json(meta or {}), now, None, 0)

        def insert(conn: sqlite3.Connection) -> list[str]:
            gone = evict(conn, "streams", "seq", now, None)
            if conn.execute("SELECT 1 FROM streams WHERE id = ?", (stream_id,)).fetchone():
                raise ConflictError(f"Stream '{stream_id}' already exists.", "already_exists")
            conn.execute("INSERT INTO streams (id, meta, state, created_at, expires_at) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (stream_id, dumps(info.meta), info.state.value, now,
                          self._retention.open_expires_at(now)))
            return gone + evict(conn, "streams", "seq", now, self._retention.max_entries)

        self._wake(await self._db.write(insert))
        return info

    async def append(self, stream_id: str, event: str, data: str) -> int:
        now = self._clock()

        def insert(conn: sqlite3.Connection) -> int:
            info = _open_info(conn, stream_id, now)
            if info.finished:
                raise ConflictError(f"Stream '{stream_id}' is finished.", "stream_finished")
            frame_id = info.last_id + 1
            conn.execute("INSERT INTO frames VALUES (?, ?, ?, ?)",
                         (stream_id, frame_id, str(event), str(data)))
            conn.execute("UPDATE streams SET last_id = ? WHERE id = ?", (frame_id, stream_id))
            return frame_id

        frame_id = await self._db.write(insert)
        self.notifier.notify(stream_id)
        return frame_id

    async def read(self, stream_id: str, after: int = 0, limit: int | None = None) -> list[Frame]:
        now = self._clock()

        def select(conn: sqlite3.Connection) -> list[Frame]:
            if _live_info(conn, stream_id, now) is None:
                return []
            rows = conn.execute(
                "SELECT frame_id, event, data FROM frames WHERE stream_id = ? AND frame_id > ? "
                "ORDER BY frame_id LIMIT ?",
                (stream_id, max(after, 0), -1 if limit is None else limit))
            return [Frame(*row) for row in rows]

        return await self._db.read(select)

    async def finish(self, stream_id: str, state: StreamState = StreamState.COMPLETED) -> bool:
        if state is StreamState.OPEN:
            raise ValueError("finish needs a terminal state")
        now = self._clock()

        def update(conn: sqlite3.Connection) -> bool:
            if _open_info(conn, stream_id, now).finished:
                return False
            conn.execute("UPDATE streams SET state = ?, finished_at = ?, expires_at = ? "
                         "WHERE id = ?",
                         (state.value, now, self._retention.expires_at(now), stream_id))
            return True

        changed = await self._db.write(update)
        self.notifier.notify(stream_id)
        return changed

    async def get(self, stream_id: str) -> StreamInfo | None:
        now = self._clock()
        return await self._db.read(lambda conn: _live_info(conn, stream_id, now))

    async def delete(self, stream_id: str) -> bool:
        now = self._clock()
        found = await self._db.write(lambda conn: delete_row(conn, "streams", stream_id, now))
        self.notifier.notify(stream_id)
        return found

    async def purge(self) -> int:
        now, cap = self._clock(), self._retention.max_entries
        gone = await self._db.write(lambda conn: evict(conn, "streams", "seq", now, cap))
        self._wake(gone)
        return len(gone)

    def _wake(self, stream_ids: list[str]) -> None:
        for stream_id in stream_ids:
            self.notifier.notify(stream_id)
