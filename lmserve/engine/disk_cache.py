"""A disk cache of llama.cpp sequence states, so a restarted server skips long prefixes, and
the same cache in RAM (a private tmpfs directory), so conversations evicted from the KV come
back without recomputing their history.

When a slot is released with at least `min_tokens` tokens of KV, its sequence state (the KV
cells of that sequence id) is copied out on the engine thread, a memcpy, and written by a
background thread, so decoding never waits for the disk. At admission, if a stored state
shares a longer prefix with the prompt than any resident slot does (by `min_tokens` at least),
its file is read and checked by a reader thread while the running sequences keep decoding
(the request waits at the head of the queue meanwhile), then loaded into the slot on the
engine thread, a memcpy, and the tail past the shared part is removed.

Entries are keyed by a compatibility key (model file identity and the state format of this
llama.cpp build and context) and by the LoRA set; a file made under another key is ignored.
The directory is indexed at start-up from the file headers, and least recently used entries are
removed to stay under `max_bytes` (per model: each model's cache counts only its own files).

The RAM tier (`DiskCache.open_ram`, `--cache-ram`) is this cache in a directory of its own
under /dev/shm, removed when the model unloads (and, after a crash, by the next start): the
writes and reads are memory copies, and its states cost the machine's memory, not the
process's RSS. With both tiers (`CacheTiers`) a released slot's state goes to each, and a
lookup takes the longest prefix either holds (the RAM tier's on a tie: no disk read).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Protocol

from lmserve.core.procs import pid_alive
from lmserve.engine.state_file import (
    HEADER_SIZE,
    SUFFIX,
    CorruptStateFile,
    Entry,
    IncompatibleStateFile,
    adapters_key,
    compat_key,
    encode_header,
    read_state,
    remove_quietly,
    scan_directory,
    write_atomic,
)
from lmserve.engine.token_prefix import common_prefix_len

log = logging.getLogger("lmserve.disk_cache")

Adapters = tuple[tuple[str, float], ...]
_MAX_LOAD_FAILURES = 3
_MAX_PENDING_BYTES = 1 << 30  # states copied out, not yet written, beyond the first
_MAX_READS = 2  # states read ahead of their load; the oldest is dropped beyond this
_READ_WAIT = 0.002  # seconds the engine waits for a read before it defers the admission


class StateIO(Protocol):
    """What the cache needs from the context (runner.Context, or a fake)."""

    def state_format(self) -> str: ...
    def state_seq_size(self, seq_id: int) -> int: ...
    def state_seq_get(self, seq_id: int) -> bytearray: ...
    def state_seq_set(self, seq_id: int, data: bytearray) -> int: ...
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...


@dataclass
class DiskCacheStats:
    hits: int = 0  # states loaded into a slot
    tokens_loaded: int = 0  # prompt tokens those loads supplied
    saves: int = 0  # state files written
    load_failures: int = 0
    bytes: int = 0  # size of this model's indexed files
    entries: int = 0


@dataclass(frozen=True)
class DiskHit:
    entry: Entry
    usable: int  # leading tokens of the prompt the entry's KV supplies
    cache: DiskCache | None = field(default=None, compare=False)  # the tier that holds it


@dataclass(frozen=True)
class _Job:
    name: str
    tokens: list[int]
    adapters: bytes
    blob: bytearray
    size: int


class ByteSize(int):
    """A byte count from an int or a string such as 500M, 2G or 1.5GiB (binary units)."""

    def __new__(cls, value: str | int) -> ByteSize:
        if isinstance(value, int):
            return super().__new__(cls, value)
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError(f"not a size: {value!r} (use e.g. 500M or 2G)")
        number, unit = match.groups()
        return super().__new__(cls, int(float(number) * 1024 ** " kmgt".index(unit.lower() or " ")))


class DiskCache:
    def __init__(self, directory: str, states: StateIO, *, compat: bytes, max_bytes: int,
                 min_tokens: int) -> None:
        self.directory = directory
        self.states = states
        self.compat = compat
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self.stats = DiskCacheStats()
        self._entries: dict[str, Entry] = {}
        self._pending: dict[str, _Job] = {}
        self._pending_bytes = 0
        self._adapter_keys: dict[Adapters, bytes] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="lmserve-disk-cache",
                                        daemon=True)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-disk-read")
        self._reads: dict[str, Future[tuple[object, bytearray]]] = {}  # engine thread only
        self._closed = False
        self.ephemeral = False  # the RAM tier: the directory goes when the cache closes

    @classmethod
    def open(cls, directory: str, states: StateIO, *, model_path: str, max_bytes: int,
             min_tokens: int) -> DiskCache:
        os.makedirs(directory, exist_ok=True)
        cache = cls(directory, states, compat=compat_key(model_path, states.state_format()),
                    max_bytes=max_bytes, min_tokens=min_tokens)
        cache.index()
        cache._writer.start()
        return cache

    @classmethod
    def open_ram(cls, states: StateIO, *, model_path: str, max_bytes: int, min_tokens: int,
                 base: str | None = None) -> DiskCache:
        """The RAM tier: an empty cache in a private directory under /dev/shm (`base`), which
        `close` removes. Directories left by a process that no longer runs are removed first.
        Without a writable /dev/shm it refuses (ValueError): a RAM tier on disk would be a
        slow disk cache that no restart can use."""
        base = base or RAM_BASE
        if not (os.path.isdir(base) and os.access(base, os.W_OK)):
            raise ValueError(f"--cache-ram needs a writable tmpfs at {base}; use --disk-cache "
                             "DIR instead")
        _remove_orphans(base)
        directory = tempfile.mkdtemp(prefix=f"{RAM_PREFIX}{os.getpid()}-", dir=base)
        cache = cls(directory, states, compat=compat_key(model_path, states.state_format()),
                    max_bytes=max_bytes, min_tokens=min_tokens)
        cache.ephemeral = True
        cache._writer.start()
        return cache

    # -- start-up index ---------------------------------------------------------------------
    def index(self) -> None:
        """Index the directory at start-up (file headers only), then enforce max_bytes."""
        with self._lock:
            self._entries = {os.path.basename(e.path): e
                             for e in scan_directory(self.directory, self.compat)}
            self._make_room(0)
            self._update_totals()
        log.info("disk cache %s: %d state(s), %d bytes", self.directory, self.stats.entries,
                 self.stats.bytes)

    # -- lookup and load (engine thread) ----------------------------------------------------
    def find(self, tokens: list[int], adapters: Adapters, *, limit: int, at_least: int
             ) -> DiskHit | None:
        """The entry sharing the longest prefix with `tokens` (capped at `limit`), if that is
        at least `at_least` and `min_tokens`; ties go to the smaller file."""
        need = max(at_least, self.min_tokens)
        if limit < need or not self._entries:
            return None
        key = self._adapters_key(adapters)
        best: DiskHit | None = None
        with self._lock:
            for entry in self._entries.values():
                if entry.adapters != key:
                    continue
                usable = min(common_prefix_len(entry.tokens, tokens), limit)
                if usable >= need and (best is None or usable > best.usable or (
                        usable == best.usable and entry.size < best.entry.size)):
                    best = DiskHit(entry, usable, self)
        return best

    def ready(self, hit: DiskHit, wait: float = _READ_WAIT) -> bool:
        """Whether `hit`'s file has been read and checked, so `restore` is only a memcpy.
        Starts the read on the reader thread if it is not under way, and then waits `wait`
        seconds at most: a small state is ready at once, a large or cold one is not, and the
        caller asks again at a later step (without waiting) instead of stalling every running
        sequence."""
        path = hit.entry.path
        future = self._reads.get(path)
        if future is None:
            while len(self._reads) >= _MAX_READS:  # read for a request that went elsewhere
                self._reads.pop(next(iter(self._reads))).cancel()
            future = self._reads[path] = self._reader.submit(read_state, path)
            if wait > 0:
                wait_for([future], timeout=wait)
        return future.done()

    def restore(self, hit: DiskHit, seq_id: int) -> int:
        """Load the entry into `seq_id` (which must be empty) and keep its first `usable`
        tokens; returns the tokens now in the KV, 0 when the load failed (nothing kept).
        Uses the read `ready` started, or reads the file here if there was none."""
        entry = hit.entry
        future = self._reads.pop(entry.path, None)
        try:
            _header, blob = future.result() if future is not None else read_state(entry.path)
        except (CorruptStateFile, IncompatibleStateFile, OSError) as exc:
            return self._load_failed(entry, f"cannot read it: {exc}", drop=True)
        if not self.states.state_seq_set(seq_id, blob) or \
                not self.states.seq_rm(seq_id, hit.usable, -1):
            self.states.seq_rm(seq_id, -1, -1)
            entry.failures += 1
            # Usually the KV pool had no contiguous room, which passes; a state that keeps
            # failing is dropped so it does not cost a read at every admission.
            return self._load_failed(entry, "llama.cpp refused the state",
                                     drop=entry.failures >= _MAX_LOAD_FAILURES)
        self.stats.hits += 1
        self.stats.tokens_loaded += hit.usable
        entry.last_used = time.time()
        try:
            os.utime(entry.path)  # the LRU order survives a restart
        except OSError:
            pass
        return hit.usable

    def _load_failed(self, entry: Entry, why: str, *, drop: bool) -> int:
        log.warning("disk cache: could not load %s (%s)%s; computing the prefix instead",
                    entry.path, why, ", removed" if drop else "")
        self.stats.load_failures += 1
        if drop:
            with self._lock:
                self._drop([entry])
                self._update_totals()
        return 0

    # -- saving -----------------------------------------------------------------------------
    def offer(self, seq_id: int, tokens: list[int], adapters: Adapters) -> None:
        """A released slot's KV: queue it for writing if it adds `min_tokens` to what is
        stored. Runs on the engine thread; the copy is a memcpy, the write is not waited for."""
        if self._closed or len(tokens) < self.min_tokens:
            return
        key = self._adapters_key(adapters)
        with self._lock:
            if not self._adds_enough(tokens, key, [*self._entries.values(),
                                                   *self._pending.values()]):
                return
        state_size = self.states.state_seq_size(seq_id)
        size = HEADER_SIZE + 4 * len(tokens) + state_size
        if not state_size or size > self.max_bytes or (
                self._pending and self._pending_bytes + size > _MAX_PENDING_BYTES):
            return  # a slow disk: drop this save rather than hold more states in memory
        blob = self.states.state_seq_get(seq_id)
        tokens = list(tokens)
        job = _Job(self._file_name(key, tokens), tokens, key, blob,
                   HEADER_SIZE + 4 * len(tokens) + len(blob))
        with self._lock:
            self._pending[job.name] = job
            self._pending_bytes += job.size
        self._queue.put(job)

    def _adds_enough(self, tokens: list[int], key: bytes, stored: Iterable[Entry | _Job]) -> bool:
        """False when some stored or queued state already covers all but < min_tokens of it."""
        most = len(tokens) - self.min_tokens
        return all(common_prefix_len(s.tokens, tokens) <= most
                   for s in stored if s.adapters == key)

    def _file_name(self, key: bytes, tokens: list[int]) -> str:
        digest = hashlib.sha256(self.compat + key + repr(tokens).encode()).hexdigest()
        return digest[:40] + SUFFIX

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._write(job)
            except Exception as exc:  # a full disk must not stop later saves or the engine
                log.warning("disk cache: could not save a state to %s: %s", self.directory, exc)
            finally:
                with self._lock:
                    self._pending.pop(job.name, None)
                    self._pending_bytes -= job.size

    def _write(self, job: _Job) -> None:
        header = encode_header(self.compat, job.adapters, job.tokens, job.blob)
        with self._lock:
            self._make_room(job.size)
        path = os.path.join(self.directory, job.name)
        write_atomic(path, header, job.blob)
        entry = Entry(path, job.tokens, job.adapters, job.size, time.time())
        with self._lock:
            # Entries whose tokens are a prefix of the new one's are served by it as well.
            self._drop([e for e in self._entries.values() if e.adapters == job.adapters
                        and e.path != path
                        and common_prefix_len(e.tokens, job.tokens) == len(e.tokens)])
            self._entries[job.name] = entry
            self.stats.saves += 1
            self._update_totals()

    # -- eviction (callers hold the lock) ---------------------------------------------------
    def _make_room(self, incoming: int) -> None:
        total = sum(e.size for e in self._entries.values()) + incoming
        for victim in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.max_bytes:
                break
            total -= victim.size
            self._drop([victim])

    def _drop(self, entries: list[Entry]) -> None:
        for entry in entries:
            self._entries.pop(os.path.basename(entry.path), None)
            remove_quietly(entry.path)

    def _update_totals(self) -> None:
        self.stats.bytes = sum(e.size for e in self._entries.values())
        self.stats.entries = len(self._entries)

    def _adapters_key(self, adapters: Adapters) -> bytes:
        key = self._adapter_keys.get(adapters)
        if key is None:
            key = self._adapter_keys[adapters] = adapters_key(adapters)
        return key

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued state is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._pending

    def clear(self, timeout: float = 30.0) -> int | None:
        """Remove every saved state (a cache flush); the states still being written are
        waited for first, so none of them lands after. Returns how many were removed, or None
        when those writes did not finish within `timeout` (nothing removed)."""
        if not self.flush(timeout):
            return None
        with self._lock:
            entries = list(self._entries.values())
            self._drop(entries)
            self._update_totals()
        return len(entries)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes (up to `timeout` seconds), then stop the writer."""
        self._closed = True
        self._reads.clear()
        self._reader.shutdown(wait=False, cancel_futures=True)
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout)
        if self.ephemeral:
            with self._lock:
                self._entries.clear()
                self._update_totals()
            shutil.rmtree(self.directory, ignore_errors=True)


RAM_BASE = "/dev/shm"
RAM_PREFIX = "lmserve-ram-"


def _remove_orphans(base: str) -> None:
    """RAM tiers of processes that are gone (a crash, a kill -9): their states are unusable."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid = name[len(RAM_PREFIX):].split("-", 1)[0] if name.startswith(RAM_PREFIX) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


class SavedStates(Protocol):
    """What the prefix cache uses of saved states: one DiskCache, or CacheTiers."""

    @property
    def min_tokens(self) -> int: ...
    def find(self, tokens: list[int], adapters: Adapters, *, limit: int, at_least: int
             ) -> DiskHit | None: ...
    def ready(self, hit: DiskHit, wait: float = ...) -> bool: ...
    def restore(self, hit: DiskHit, seq_id: int) -> int: ...
    def offer(self, seq_id: int, tokens: list[int], adapters: Adapters) -> None: ...
    def flush(self, timeout: float = ...) -> bool: ...
    def clear(self, timeout: float = ...) -> int | None: ...
    def close(self, timeout: float = ...) -> None: ...


class CacheTiers:
    """A RAM tier over a disk tier (see the module's docstring)."""

    def __init__(self, ram: DiskCache, disk: DiskCache) -> None:
        self.ram, self.disk = ram, disk

    @property
    def min_tokens(self) -> int:
        return min(self.ram.min_tokens, self.disk.min_tokens)

    def find(self, tokens: list[int], adapters: Adapters, *, limit: int, at_least: int
             ) -> DiskHit | None:
        hits = [hit for tier in (self.ram, self.disk)
                if (hit := tier.find(tokens, adapters, limit=limit, at_least=at_least))]
        return max(hits, key=lambda hit: hit.usable) if hits else None  # the first on a tie

    def ready(self, hit: DiskHit, wait: float = _READ_WAIT) -> bool:
        return self._tier(hit).ready(hit, wait)

    def restore(self, hit: DiskHit, seq_id: int) -> int:
        return self._tier(hit).restore(hit, seq_id)

    def offer(self, seq_id: int, tokens: list[int], adapters: Adapters) -> None:
        self.ram.offer(seq_id, tokens, adapters)
        self.disk.offer(seq_id, tokens, adapters)

    def flush(self, timeout: float = 30.0) -> bool:
        return self.ram.flush(timeout) & self.disk.flush(timeout)

    def clear(self, timeout: float = 30.0) -> int | None:
        removed = [self.ram.clear(timeout), self.disk.clear(timeout)]
        return None if None in removed else sum(n or 0 for n in removed)

    def close(self, timeout: float = 30.0) -> None:
        self.ram.close(timeout)
        self.disk.close(timeout)

    def _tier(self, hit: DiskHit) -> DiskCache:
        return hit.cache if hit.cache is not None else self.disk
