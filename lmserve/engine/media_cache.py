"""Encoded images on disk: the second tier of the projector's embedding cache.

The memory tier (runner.EmbeddingCache) is lost with the process; this one keeps a projector's
output embeddings under `--media-cache-dir` (seed 003's `mtmd.embedding_cache.path`), one file
per image, named by the image's content hash (sha256 hex) and stored as a NumPy .npy array, in
a folder per projector (its file's resolved path, size and modification time, and the model's
embedding width, hashed), so a changed projector never reads another's embeddings.

Reads happen on the engine thread, in place of an encode (a file of n_tokens x n_embd floats).
Writes are queued to one background thread, which writes a temporary file and renames it, so
a reader never sees half a file and the engine never waits for the disk. The folder is indexed
at start-up (oldest modification first); a hit refreshes a file's time, and the least recently
used files are removed to keep the folder under `max_bytes` (counting the files this process
knows: replicas sharing a folder each bound their own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("lmserve.engine")

_KEY = re.compile(r"[0-9a-f]{64}")  # an image's sha256, hex
SUFFIX = ".npy"


@dataclass
class MediaDiskStats:
    hits: int = 0  # embeddings read from disk instead of encoding the image
    writes: int = 0  # embeddings written
    write_failures: int = 0
    evictions: int = 0  # files removed to stay under max_bytes
    bytes: int = 0  # the files' size now
    files: int = 0


def projector_namespace(mmproj_path: str, n_embd: int) -> str:
    """The folder name of one projector's embeddings (see the module's docstring)."""
    path = os.path.realpath(mmproj_path)
    st = os.stat(path)
    ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{n_embd}"
    return "mmproj-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


class EmbeddingDisk:
    """One projector's embeddings on disk, by image content hash, bounded by `max_bytes`."""

    def __init__(self, root: str, namespace: str, max_bytes: int) -> None:
        self.dir = Path(root).expanduser() / namespace
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"the media cache folder {str(self.dir)!r} "
                               f"(--media-cache-dir) cannot be made: {exc}") from None
        self.max_bytes = max_bytes
        self.stats = MediaDiskStats()
        self._lock = threading.Lock()  # the index: the engine thread reads, the writer writes
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, oldest first
        self._pending: set[str] = set()  # keys queued for writing
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-media-disk")
        self._scan()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.startswith("."):  # a temporary file a crash left behind
                _unlink(Path(entry.path))
                continue
            key = name.removesuffix(SUFFIX)
            if not name.endswith(SUFFIX) or not _KEY.fullmatch(key):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self.stats.bytes += size
        self.stats.files = len(self._index)
        with self._lock:
            self._evict()
        if found:
            log.info("media disk cache %s: %d encoded images, %d bytes", self.dir,
                     self.stats.files, self.stats.bytes)

    def get(self, key: str, n_values: int) -> np.ndarray | None:
        """The image's embeddings ([n_values] float32), or None. Engine thread."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            embd: np.ndarray = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("media disk cache: %s is unreadable (%s); removed", path.name, exc)
            self._forget(key)
            return None
        if embd.dtype != np.float32 or embd.ndim != 1 or embd.shape[0] != n_values:
            log.warning("media disk cache: %s holds %s %s, not %d float32; removed", path.name,
                        embd.dtype, embd.shape, n_values)
            self._forget(key)
            return None
        self.stats.hits += 1
        try:
            self._writer.submit(_touch, path)  # its recency survives a restart
        except RuntimeError:  # closed: the server is stopping
            pass
        return embd

    def put(self, key: str, embd: np.ndarray) -> None:
        """Queue the embeddings for writing (engine thread; the writer thread writes)."""
        if not _KEY.fullmatch(key) or embd.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._index or key in self._pending:
                return
            self._pending.add(key)
        try:
            self._writer.submit(self._write, key, embd)
        except RuntimeError:  # closed: the server is stopping
            with self._lock:
                self._pending.discard(key)

    def _write(self, key: str, embd: np.ndarray) -> None:
        final = self._path(key)
        tmp = self.dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with tmp.open("wb") as f:
                np.save(f, embd, allow_pickle=False)
            os.replace(tmp, final)
            size = final.stat().st_size
        except OSError as exc:
            _unlink(tmp)
            self.stats.write_failures += 1
            log.warning("media disk cache: writing %s failed: %s", final.name, exc)
            with self._lock:
                self._pending.discard(key)
            return
        with self._lock:
            self._pending.discard(key)
            if key in self._index:
                self.stats.bytes -= self._index[key]
            self._index[key] = size
            self.stats.bytes += size
            self.stats.writes += 1
            self._evict()
            self.stats.files = len(self._index)

    def _evict(self) -> None:
        """Remove least recently used files until under max_bytes (the lock is held)."""
        while self.stats.bytes > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self.stats.bytes -= size
            self.stats.evictions += 1
            _unlink(self._path(key))
        self.stats.files = len(self._index)

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self.stats.bytes -= size
            self.stats.files = len(self._index)
        _unlink(self._path(key))

    def flush(self) -> None:
        """Wait for the queued writes (tests, and close)."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Finish the queued writes and stop the writer."""
        self._writer.shutdown(wait=True)


def _touch(path: Path) -> None:
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
