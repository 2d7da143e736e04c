"""Stored responses and sessions in SQLite, and the SQLite Store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmserve.stores.base import ResponseStore, SessionStore, Store
from lmserve.stores.records import (
    JSON,
    Clock,
    ConflictError,
    ItemPage,
    NotFoundError,
    PageQuery,
    ResponseRecord,
    Retention,
    RetentionPolicy,
    Session,
    SessionInfo,
    check_id,
    check_messages,
    copy_json,
    dumps,
    make_page,
    unknown_cursor,
)
from lmserve.stores.sqlite_db import LIVE, SqliteDatabase, delete_row, evict, is_live
from lmserve.stores.sqlite_schema import item_rows
from lmserve.stores.sqlite_streams import SqliteStreams


class SqliteResponses(ResponseStore):
    def __init__(self, db: SqliteDatabase, retention: Retention, clock: Clock) -> None:
        self._db = db
        self._retention = retention
        self._clock = clock

    async def put(self, record: ResponseRecord) -> None:
        check_id(record.id, "response")
        now = self._clock()
        fields = (record.created_at, record.model, record.previous_response_id,
                  dumps(record.response), dumps(record.metadata), record.owner)
        items = item_rows(record.id, record.input_items)

        def upsert(conn: sqlite3.Connection) -> None:
            if is_live(conn, "responses", record.id, now):
                conn.execute("UPDATE responses SET created_at = ?, model = ?, "
                             "previous_response_id = ?, response = ?, metadata = ?, owner = ? "
                             "WHERE id = ?", (*fields, record.id))
                conn.execute("DELETE FROM response_items WHERE response_id = ?", (record.id,))
            else:
                conn.execute("DELETE FROM responses WHERE id = ?", (record.id,))
                conn.execute("INSERT INTO responses (created_at, model, previous_response_id, "
                             "response, metadata, owner, id, expires_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (*fields, record.id, self._retention.expires_at(now)))
            conn.executemany("INSERT INTO response_items VALUES (?, ?, ?, ?)", items)
            evict(conn, "responses", "seq", now, self._retention.max_entries)

        await self._db.write(upsert)

    async def get(self, response_id: str) -> ResponseRecord | None:
        now = self._clock()

        def select(conn: sqlite3.Connection) -> ResponseRecord | None:
            row = conn.execute(
                "SELECT id, created_at, model, previous_response_id, response, metadata, "
                f"owner FROM responses WHERE id = ? AND {LIVE}", (response_id, now)).fetchone()
            if row is None:
                return None
            items = conn.execute("SELECT item FROM response_items WHERE response_id = ? "
                                 "ORDER BY position", (response_id,))
            return ResponseRecord(id=row[0], created_at=row[1], model=row[2],
                                  previous_response_id=row[3], response=json.loads(row[4]),
                                  metadata=json.loads(row[5]), owner=row[6],
                                  input_items=[json.loads(item) for (item,) in items])

        return await self._db.read(select)

    async def delete(self, response_id: str) -> bool:
        now = self._clock()
        return await self._db.write(lambda conn: delete_row(conn, "responses", response_id, now))

    async def input_items(self, response_id: str, query: PageQuery = PageQuery()) -> ItemPage:
        now = self._clock()
        return await self._db.read(lambda conn: _items_page(conn, response_id, query, now))

    async def purge(self) -> int:
        now, cap = self._clock(), self._retention.max_entries
        return len(await self._db.write(lambda conn: evict(conn, "responses", "seq", now, cap)))


def _items_page(conn: sqlite3.Connection, response_id: str, query: PageQuery,
                now: float) -> ItemPage:
    """One page by positions: list order is position order for asc, reversed for desc; a
    `before` cursor walks against list order from the cursor, `after` along it."""
    if not is_live(conn, "responses", response_id, now):
        raise NotFoundError("Response", response_id)
    forward = query.before is None
    cursor = query.after if forward else query.before
    ascending_positions = (query.order == "asc") == forward
    direction = "ASC" if ascending_positions else "DESC"
    where, args = "response_id = ?", [response_id]
    if cursor is not None:
        first_in_list = "ASC" if query.order == "asc" else "DESC"
        row = conn.execute("SELECT position FROM response_items WHERE response_id = ? AND "
                           f"item_id = ? ORDER BY position {first_in_list} LIMIT 1",
                           (response_id, cursor)).fetchone()
        if row is None:
            raise unknown_cursor("after" if forward else "before", cursor)
        where += f" AND position {'>' if ascending_positions else '<'} ?"
        args.append(row[0])
    rows = conn.execute(f"SELECT item FROM response_items WHERE {where} "
                        f"ORDER BY position {direction} LIMIT ?", (*args, query.limit + 1))
    return make_page([json.loads(item) for (item,) in rows], query.limit, reverse=not forward)


_SESSION = ("SELECT id, model, system, metadata, created_at, updated_at, "
            "(SELECT count(*) FROM session_messages WHERE session_id = sessions.id) FROM sessions")
_NEXT_TOUCH = "(SELECT coalesce(max(touched), 0) + 1 FROM sessions)"


def _session_info(row: tuple[Any, ...]) -> SessionInfo:
    ident, model, system, metadata, created_at, updated_at, count = row
    return SessionInfo(ident, model, system, json.loads(metadata), created_at, updated_at, count)


def _live_session(conn: sqlite3.Connection, session_id: str, now: float) -> SessionInfo | None:
    row = conn.execute(f"{_SESSION} WHERE id = ? AND {LIVE}", (session_id, now)).fetchone()
    return None if row is None else _session_info(row)


class SqliteSessions(SessionStore):
    def __init__(self, db: SqliteDatabase, retention: Retention, clock: Clock) -> None:
        self._db = db
        self._retention = retention
        self._clock = clock

    async def create(self, session_id: str, *, model: str, system: str | None = None,
                     metadata: JSON | None = None) -> Session:
        check_id(session_id, "session")
        now = self._clock()
        session = Session(session_id, model, system, copy_json(metadata or {}), now, now, 0)

        def insert(conn: sqlite3.Connection) -> None:
            evict(conn, "sessions", "touched", now, None)
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise ConflictError(f"Session '{session_id}' already exists.", "already_exists")
            conn.execute("INSERT INTO sessions (id, model, system, metadata, created_at, "
                         f"updated_at, touched, expires_at) VALUES (?, ?, ?, ?, ?, ?, "
                         f"{_NEXT_TOUCH}, ?)",
                         (session_id, model, system, dumps(session.metadata), now, now,
                          self._retention.expires_at(now)))
            evict(conn, "sessions", "touched", now, self._retention.max_entries)

        await self._db.write(insert)
        return session

    async def get(self, session_id: str, *, messages: bool = True) -> Session | None:
        now = self._clock()

        def select(conn: sqlite3.Connection) -> Session | None:
            info = _live_session(conn, session_id, now)
            if info is None:
                return None
            rows = conn.execute("SELECT message FROM session_messages WHERE session_id = ? "
                                "ORDER BY position", (session_id,)) if messages else []
            return Session(**vars(info), messages=[json.loads(m) for (m,) in rows])

        return await self._db.read(select)

    async def append(self, session_id: str, messages: Sequence[JSON]) -> SessionInfo:
        batch = [dumps(message) for message in check_messages(messages)]
        now = self._clock()

        def insert(conn: sqlite3.Connection) -> SessionInfo:
            info = _live_session(conn, session_id, now)
            if info is None:
                raise NotFoundError("Session", session_id)
            start = info.message_count + 1
            conn.executemany("INSERT INTO session_messages VALUES (?, ?, ?)",
                             [(session_id, start + i, m) for i, m in enumerate(batch)])
            conn.execute(f"UPDATE sessions SET updated_at = ?, touched = {_NEXT_TOUCH}, "
                         "expires_at = ? WHERE id = ?",
                         (now, self._retention.expires_at(now), session_id))
            return SessionInfo(info.id, info.model, info.system, info.metadata, info.created_at,
                               now, info.message_count + len(batch))

        return await self._db.write(insert)

    async def delete(self, session_id: str) -> bool:
        now = self._clock()
        return await self._db.write(lambda conn: delete_row(conn, "sessions", session_id, now))

    async def _recent(self, limit: int) -> list[SessionInfo]:
        now = self._clock()
        return await self._db.read(lambda conn: [_session_info(row) for row in conn.execute(
            f"{_SESSION} WHERE {LIVE} ORDER BY touched DESC LIMIT ?", (now, limit))])

    async def purge(self) -> int:
        now, cap = self._clock(), self._retention.max_entries
        return len(await self._db.write(lambda conn: evict(conn, "sessions", "touched", now, cap)))


async def open_sqlite(path: str | Path, retention: RetentionPolicy, clock: Clock, *,
                      synchronous: str = "normal", poll_interval: float = 0.5) -> Store:
    db = SqliteDatabase(path, synchronous)
    await db.open()
    return Store("sqlite", db.path,
                 streams=SqliteStreams(db, retention.streams, clock, poll_interval),
                 responses=SqliteResponses(db, retention.responses, clock),
                 sessions=SqliteSessions(db, retention.sessions, clock), closer=db.close)
