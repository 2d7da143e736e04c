"""Fixtures that run the same store tests against memory, SQLite and a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lmserve.stores import RetentionPolicy, Store, open_store

BACKENDS = ("memory", "sqlite", "redis")
OpenStore = Callable[..., Awaitable[Store]]
_SYSTEM_BIN = "/usr/bin:/usr/sbin:/usr/local/bin"  # where Debian's package puts it


class FakeClock:
    """The stores' notion of now; tests move it instead of sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on loopback (Debian package `redis-server`)."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path=_SYSTEM_BIN)
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); "
                    "the Redis backend tests need a real server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--save", "", "--appendonly", "no", "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not _redis_ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'store.db'}"
    return "memory"


@pytest.fixture
async def open_test_store(store_url: str, clock: FakeClock) -> AsyncIterator[OpenStore]:
    """Opens stores on the backend under test, each Redis one under a fresh key prefix.

    The cross-process poll is set very long, so a test of waking up can only pass through the
    in-process (or pub/sub) notification."""
    opened: list[Store] = []

    async def open_one(retention: RetentionPolicy = RetentionPolicy(), **options: object) -> Store:
        options.setdefault("poll_interval", 600.0)
        store = await open_store(store_url, retention=retention, clock=clock,
                                 prefix=f"test-{uuid.uuid4().hex[:12]}:", **options)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_test_store: OpenStore) -> Store:
    return await open_test_store()
