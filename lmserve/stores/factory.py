"""Choose and open a backend from a URL-like setting.

  memory                        in-process dicts, gone at exit (tests, or storage off)
  sqlite (or None, sqlite://)   <data dir>/lmserve.db, the default
  sqlite:///abs/path.db         that file; sqlite://rel/path.db is relative to the working dir
     ?synchronous=normal|full|extra   (normal: survives SIGKILL; full: also a power cut)
  redis://[:password@]host:port/db, rediss://..., unix:///path.sock   shared by several replicas
     ?lease_ttl=SECONDS   (default 15: how soon a replica that stopped refreshing its lease
                          counts as gone, and its native streams are ended by the others)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qs

from lmserve.stores.base import Store
from lmserve.stores.memory import open_memory
from lmserve.stores.records import Clock, RetentionPolicy
from lmserve.stores.redis_store import open_redis
from lmserve.stores.sqlite_store import open_sqlite

DB_FILE = "lmserve.db"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_URL_HELP = "use memory, sqlite:///path/to/file.db or redis://host:port/db"


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/lmserve, else ~/.local/share/lmserve."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "lmserve"


def sqlite_target(url: str | None, data_dir: Path | None) -> tuple[Path, str]:
    """The database path and synchronous mode named by a sqlite URL (or None)."""
    rest = (url or "").removeprefix("sqlite").removeprefix("://")
    path_part, _, query = rest.partition("?")
    options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    unknown = set(options) - {"synchronous"}
    if unknown:
        raise ValueError(f"unknown sqlite store option(s) {', '.join(sorted(unknown))}; "
                         "the only option is synchronous=normal|full|extra")
    synchronous = options.get("synchronous", ["normal"])[-1].lower()
    path = Path(path_part) if path_part else (data_dir or default_data_dir()) / DB_FILE
    return path, synchronous


async def open_store(url: str | None = None, *, data_dir: str | Path | None = None,
                     retention: RetentionPolicy = RetentionPolicy(), prefix: str = "lmserve:",
                     clock: Clock = time.time, poll_interval: float = 0.5) -> Store:
    """Open the store a URL names (see the module docstring); close() it when done.

    prefix namespaces every Redis key. poll_interval is how often a stream follower rechecks
    for changes nothing signals to it: frames written by another process sharing the SQLite
    file, a Redis wake-up lost while reconnecting, or the stream expiring.
    """
    if url == "memory" or url == "memory://":
        return open_memory(retention, clock, poll_interval)
    if url is None or url in ("", "sqlite") or url.startswith("sqlite://"):
        path, synchronous = sqlite_target(url, Path(data_dir) if data_dir else None)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return await open_sqlite(path, retention, clock, synchronous=synchronous,
                                 poll_interval=poll_interval)
    if url.startswith(_REDIS_SCHEMES):
        return await open_redis(url, retention, clock, prefix=prefix, poll_interval=poll_interval)
    raise ValueError(f"unknown store URL {url!r}: {_URL_HELP}")
