"""The SQLite schema as an ordered list of migrations (sqlite_db.migrate applies them).

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from lmserve.stores.records import dumps

Migration = Callable[[sqlite3.Connection], None]

_V1 = (
    """CREATE TABLE streams (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        meta TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL,
        last_id INTEGER NOT NULL DEFAULT 0,
        expires_at REAL)""",
    "CREATE INDEX streams_expiry ON streams (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE frames (
        stream_id TEXT NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
        frame_id INTEGER NOT NULL,
        event TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (stream_id, frame_id)) WITHOUT ROWID""",
    """CREATE TABLE responses (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        model TEXT NOT NULL,
        previous_response_id TEXT,
        input_items TEXT NOT NULL,
        response TEXT NOT NULL,
        metadata TEXT NOT NULL,
        expires_at REAL)""",
    "CREATE INDEX responses_expiry ON responses (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE sessions (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL,
        system TEXT,
        metadata TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        touched INTEGER NOT NULL,
        expires_at REAL)""",
    "CREATE INDEX sessions_touched ON sessions (touched)",
    "CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE session_messages (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        message TEXT NOT NULL,
        PRIMARY KEY (session_id, position)) WITHOUT ROWID""",
)


def _v1_initial(conn: sqlite3.Connection) -> None:
    for statement in _V1:
        conn.execute(statement)


def _v2_input_items_table(conn: sqlite3.Connection) -> None:
    """Input items move from one JSON array per response to a row each, so a page of a long
    conversation is read with an indexed range query instead of decoding the whole array."""
    conn.execute("""CREATE TABLE response_items (
        response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        item_id TEXT,
        item TEXT NOT NULL,
        PRIMARY KEY (response_id, position)) WITHOUT ROWID""")
    conn.execute("CREATE INDEX response_items_by_id ON response_items (response_id, item_id)")
    rows = conn.execute("SELECT id, input_items FROM responses").fetchall()
    for response_id, items_json in rows:
        conn.executemany("INSERT INTO response_items VALUES (?, ?, ?, ?)",
                         item_rows(response_id, json.loads(items_json)))
    conn.execute("ALTER TABLE responses DROP COLUMN input_items")


def item_rows(response_id: str, items: list[Any]) -> list[tuple[str, int, str | None, str]]:
    rows = []
    for position, item in enumerate(items, start=1):
        ident = item.get("id") if isinstance(item, dict) else None
        rows.append((response_id, position, ident if isinstance(ident, str) else None,
                     dumps(item)))
    return rows


def _v3_response_owner(conn: sqlite3.Connection) -> None:
    """The name of the API key that created a response (NULL: none, or stored before)."""
    conn.execute("ALTER TABLE responses ADD COLUMN owner TEXT")


MIGRATIONS: tuple[Migration, ...] = (_v1_initial, _v2_input_items_table, _v3_response_owner)
LATEST = len(MIGRATIONS)
