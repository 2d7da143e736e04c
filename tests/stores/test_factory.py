"""open_store: URL parsing, defaults, errors, and Redis key namespacing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.stores import Retention, open_store
from lmserve.stores.factory import default_data_dir, sqlite_target
from lmserve.stores.redis_store import lease_option, redacted
from tests.stores.conftest import free_port


def test_sqlite_urls_name_a_file_and_a_sync_mode(tmp_path: Path) -> None:
    assert sqlite_target(None, tmp_path) == (tmp_path / "lmserve.db", "normal")
    assert sqlite_target("sqlite", tmp_path) == (tmp_path / "lmserve.db", "normal")
    assert sqlite_target("sqlite://", tmp_path) == (tmp_path / "lmserve.db", "normal")
    assert sqlite_target("sqlite:///srv/db/x.db", tmp_path) == (Path("/srv/db/x.db"), "normal")
    assert sqlite_target("sqlite://rel/x.db", None) == (Path("rel/x.db"), "normal")
    assert sqlite_target("sqlite:///x.db?synchronous=FULL", None) == (Path("/x.db"), "full")
    with pytest.raises(ValueError, match="wal_size"):
        sqlite_target("sqlite:///x.db?wal_size=1", None)


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "lmserve"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "lmserve"


async def test_default_store_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    async with await open_store(data_dir=tmp_path / "data") as store:
        assert store.kind == "sqlite"
        assert (tmp_path / "data" / "lmserve.db").exists()
    async with await open_store("memory") as store:
        assert store.kind == "memory"


async def test_unknown_urls_and_bad_retention_are_refused() -> None:
    with pytest.raises(ValueError, match="memory, sqlite:///path/to/file.db or redis://"):
        await open_store("postgres://localhost/db")
    with pytest.raises(ValueError, match="ttl"):
        Retention(ttl=0)
    with pytest.raises(ValueError, match="max_entries"):
        Retention(max_entries=0)


async def test_unreachable_redis_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="cannot reach Redis at redis://:\\*\\*\\*@127"):
        await open_store(f"redis://:secret@127.0.0.1:{free_port()}/0")


def test_redacted_hides_only_the_password() -> None:
    assert redacted("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"


def test_the_lease_ttl_option_is_taken_out_of_the_redis_url() -> None:
    assert lease_option("redis://h:1/0") == ("redis://h:1/0", 15.0)
    assert lease_option("redis://h:1/0?lease_ttl=2.5") == ("redis://h:1/0", 2.5)
    assert lease_option("redis://h:1/0?lease_ttl=4&socket_timeout=3") == (
        "redis://h:1/0?socket_timeout=3", 4.0)
    for bad in ("0", "0.5", "soon", "nan", "99999"):
        with pytest.raises(ValueError, match="lease_ttl"):
            lease_option(f"redis://h:1/0?lease_ttl={bad}")
