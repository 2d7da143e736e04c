"""SQLite only: durability across reopen and SIGKILL, migrations, several writers on one file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lmserve.stores import ResponseRecord, Store, StreamState, open_store
from lmserve.stores.sqlite_db import SchemaTooNew, connect, migrate, schema_version
from lmserve.stores.sqlite_schema import LATEST

GUARD = 20.0


def url(path: Path) -> str:
    return f"sqlite://{path}"


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    async with await open_store(url(tmp_path / "a.db")) as store:
        await store.streams.create("s", {"k": "v"})
        await store.streams.append("s", "delta", "one")
        await store.streams.finish("s")
        await store.responses.put(ResponseRecord("resp_1", 1.5, "m", [{"id": "msg_1"}],
                                                 {"id": "resp_1", "output": []}))
        await store.sessions.create("sess", model="m", system="sys")
        await store.sessions.append("sess", [{"role": "user", "content": "hi"}])
    async with await open_store(url(tmp_path / "a.db")) as store:
        assert [f.data for f in await store.streams.read("s")] == ["one"]
        info = await store.streams.get("s")
        assert info is not None and info.state is StreamState.COMPLETED and info.meta == {"k": "v"}
        record = await store.responses.get("resp_1")
        assert record is not None and record.input_items == [{"id": "msg_1"}]
        session = await store.sessions.get("sess")
        assert session is not None and session.messages == [{"role": "user", "content": "hi"}]


async def test_database_uses_wal_and_the_requested_sync_mode(tmp_path: Path) -> None:
    async with await open_store(url(tmp_path / "a.db") + "?synchronous=full"):
        conn = sqlite3.connect(tmp_path / "a.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    with pytest.raises(ValueError, match="synchronous"):
        await open_store(url(tmp_path / "b.db") + "?synchronous=sometimes")


_WRITER = """
import asyncio, sys
from lmserve.stores import ResponseRecord, open_store

async def main(url):
    store = await open_store(url)
    await store.sessions.create("sess", model="m")
    await store.streams.create("stream")
    i = 0
    while True:
        await store.responses.put(ResponseRecord(f"resp_{i}", 0.0, "m", [{"id": f"msg_{i}"}],
                                                 {"id": f"resp_{i}", "output": []}))
        await store.sessions.append("sess", [{"role": "user", "content": str(i)}])
        await store.streams.append("stream", "delta", str(i))
        print(i, flush=True)  # acknowledged: all three writes returned
        i += 1

asyncio.run(main(sys.argv[1]))
"""


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, url(db)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    acked = -1
    try:
        for line in proc.stdout:
            acked = int(line)
            if acked >= 40:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        tail = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, "the writer must have died by SIGKILL"
    for line in tail.splitlines():  # acks printed before the kill landed count too
        if line.strip().isdigit():
            acked = int(line)
    assert acked >= 40
    asyncio.run(_check_survivors(db, acked))


async def _check_survivors(db: Path, acked: int) -> None:
    async with await open_store(url(db)) as store:
        for i in range(acked + 1):
            assert await store.responses.get(f"resp_{i}") is not None, i
        session = await store.sessions.get("sess")
        assert session is not None
        assert [m["content"] for m in session.messages[:acked + 1]] == [str(i) for i in
                                                                         range(acked + 1)]
        frames = await store.streams.read("stream")
        assert [f.data for f in frames[:acked + 1]] == [str(i) for i in range(acked + 1)]


def _make_v1_database(path: Path) -> None:
    """A database as the first schema wrote it: input items inline in the responses table."""
    conn = connect(str(path))
    assert migrate(conn, upto=1) == 1
    items = [{"id": f"msg_{i}", "type": "message", "role": "user", "content": str(i)}
             for i in range(3)]
    conn.execute("INSERT INTO responses (id, created_at, model, previous_response_id, "
                 "input_items, response, metadata, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 ("resp_old", 1.0, "m", None, json.dumps(items),
                  json.dumps({"id": "resp_old", "output": []}), "{}", None))
    conn.execute("INSERT INTO sessions (id, model, system, metadata, created_at, updated_at, "
                 "touched, expires_at) VALUES ('sess_old', 'm', NULL, '{}', 1.0, 1.0, 1, NULL)")
    conn.execute("INSERT INTO session_messages VALUES ('sess_old', 1, ?)",
                 (json.dumps({"role": "user", "content": "kept"}),))
    conn.close()


async def test_a_v1_database_is_migrated_with_its_data(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _make_v1_database(db)
    async with await open_store(url(db)) as store:
        record = await store.responses.get("resp_old")
        assert record is not None and record.owner is None  # stored before owners were kept
        assert [i["id"] for i in record.input_items] == ["msg_0", "msg_1", "msg_2"]
        page = await store.responses.input_items("resp_old")
        assert [i["id"] for i in page.data] == ["msg_2", "msg_1", "msg_0"]
        session = await store.sessions.get("sess_old")
        assert session is not None and session.messages == [{"role": "user", "content": "kept"}]
    conn = sqlite3.connect(db)
    assert schema_version(conn) == LATEST
    columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
    assert "input_items" not in columns
    conn.close()


async def test_a_database_from_a_newer_lmserve_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    conn = connect(str(db))
    migrate(conn)
    conn.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer than this lmserve"):
        await open_store(url(db))


async def test_migrating_twice_is_a_no_op(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "x.db"))
    assert migrate(conn) == LATEST
    assert migrate(conn) == LATEST
    conn.close()


async def test_a_follower_sees_frames_written_through_another_connection(tmp_path: Path) -> None:
    """Two stores on one file stand for two processes: the follower's poll finds the frames."""
    db = url(tmp_path / "shared.db")
    async with await open_store(db, poll_interval=0.02) as reader, \
            await open_store(db, poll_interval=0.02) as writer:
        await writer.streams.create("s")
        follower = asyncio.create_task(_collect(reader, "s"))
        for i in range(5):
            await writer.streams.append("s", "delta", str(i))
        await writer.streams.finish("s")
        assert await asyncio.wait_for(follower, GUARD) == ["0", "1", "2", "3", "4"]


async def _collect(store: Store, stream_id: str) -> list[str]:
    return [f.data async for f in store.streams.follow(stream_id) if f is not None]
