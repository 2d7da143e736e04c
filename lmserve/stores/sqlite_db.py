"""One SQLite file, one connection, one worker thread: every statement runs there in order.

WAL journal: readers never block the writer. With synchronous=NORMAL a committed transaction
survives the process being killed (SIGKILL); FULL also survives a power cut, at the price of
an fsync per commit. A write that returned has been committed; a caller cancelled while its
write runs does not stop it, so that write may still commit.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from lmserve.stores.sqlite_schema import LATEST, MIGRATIONS

T = TypeVar("T")
SYNCHRONOUS_MODES = ("normal", "full", "extra")
LIVE = "(expires_at IS NULL OR expires_at > ?)"  # SQL filter; bind the current time


def connect(path: str, synchronous: str = "normal") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")  # another process may hold the write lock
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[sqlite3.Connection]:
    # IMMEDIATE takes the write lock up front, so a read-then-write cannot be invalidated.
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # some errors make SQLite roll back by itself
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SchemaTooNew(RuntimeError):
    pass


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn: sqlite3.Connection, upto: int = LATEST) -> int:
    """Bring the database to version `upto` (the latest by default); returns the version.

    Each step runs in its own IMMEDIATE transaction with the version bump, so a crash leaves a
    whole version behind and two processes opening one file cannot both apply a step."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    while True:
        with transaction(conn, write=True):
            current = schema_version(conn)
            if current > LATEST:
                raise SchemaTooNew(
                    f"the database has schema version {current}, newer than this lmserve "
                    f"understands ({LATEST}); upgrade lmserve or point it at another file")
            if current >= upto:
                return current
            MIGRATIONS[current](conn)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version VALUES (?)", (current + 1,))


def is_live(conn: sqlite3.Connection, table: str, ident: str, now: float) -> bool:
    return conn.execute(f"SELECT 1 FROM {table} WHERE id = ? AND {LIVE}",
                        (ident, now)).fetchone() is not None


def delete_row(conn: sqlite3.Connection, table: str, ident: str, now: float) -> bool:
    """Delete a row (and its children); True if it was live."""
    found = is_live(conn, table, ident, now)
    conn.execute(f"DELETE FROM {table} WHERE id = ?", (ident,))
    return found


def evict(conn: sqlite3.Connection, table: str, order_by: str, now: float,
          cap: int | None) -> list[str]:
    """Delete expired rows, then the oldest live rows beyond `cap`; returns the deleted ids.
    Child rows (frames, items, messages) go with them through ON DELETE CASCADE."""
    gone = [row[0] for row in conn.execute(f"SELECT id FROM {table} WHERE expires_at <= ?",
                                           (now,))]
    if cap is not None:
        live = conn.execute(f"SELECT count(*) FROM {table} WHERE {LIVE}", (now,)).fetchone()[0]
        if live > cap:
            gone += [row[0] for row in conn.execute(
                f"SELECT id FROM {table} WHERE {LIVE} ORDER BY {order_by} LIMIT ?",
                (now, live - cap))]
    conn.executemany(f"DELETE FROM {table} WHERE id = ?", [(ident,) for ident in gone])
    return gone


class SqliteDatabase:
    """Runs functions against the connection on the worker thread, each in a transaction."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        self.path = str(path)
        self.synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        conn = connect(self.path, self.synchronous)
        try:
            migrate(conn)
        except SchemaTooNew as exc:
            conn.close()
            raise SchemaTooNew(f"{self.path}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._call(functools.partial(self._in_transaction, fn, False))

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._call(functools.partial(self._in_transaction, fn, True))

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        if self._conn is None:
            raise RuntimeError(f"the SQLite store {self.path} is closed")
        with transaction(self._conn, write=write) as conn:
            return fn(conn)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def close(self) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=False)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
