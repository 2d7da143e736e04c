"""A fake memory with sequence states, and helpers for the disk cache tests."""

from __future__ import annotations

import os
from array import array

from lmserve.engine.disk_cache import DiskCache
from tests.unit.fakes import FakeRunner
from tests.unit.engine.test_scheduler import Harness

MIN = 8  # min_tokens in these tests


class StateRunner(FakeRunner):
    """A FakeRunner whose sequence state is its KV token list, padded to look like KV data."""

    def __init__(self, *, fmt: str = "fake-1", refuse: bool = False, pad: int = 64,
                 **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.fmt, self.refuse, self.pad = fmt, refuse, pad
        self.loads: list[tuple[int, list[int]]] = []

    def state_format(self) -> str:
        return self.fmt

    def _state(self, seq_id: int) -> bytes:
        cells = self.kv.get(seq_id, [])
        return b"FAKE" + array("i", cells).tobytes() + b"\0" * self.pad if cells else b""

    def state_seq_size(self, seq_id: int) -> int:
        return len(self._state(seq_id))

    def state_seq_get(self, seq_id: int) -> bytearray:
        return bytearray(self._state(seq_id))

    def state_seq_set(self, seq_id: int, data: bytearray) -> int:
        assert not self.kv.get(seq_id), "state loaded into a non-empty sequence"
        if self.refuse or not data.startswith(b"FAKE"):
            return 0
        cells = array("i")
        cells.frombytes(bytes(data[4:len(data) - self.pad]))
        self.kv[seq_id] = cells.tolist()
        self.loads.append((seq_id, cells.tolist()))
        return len(data)


def open_cache(directory: str, runner: StateRunner, model: str, *,
               max_bytes: int = 1 << 30) -> DiskCache:
    return DiskCache.open(directory, runner, model_path=model, max_bytes=max_bytes, min_tokens=MIN)


def save(cache: DiskCache, tokens: list[int], adapters: tuple = (), seq_id: int = 0) -> None:
    """Offer a sequence holding `tokens` and wait for the write."""
    runner = cache.states
    assert isinstance(runner, StateRunner)
    runner.kv[seq_id] = list(tokens)
    cache.offer(seq_id, tokens, adapters)
    assert cache.flush()
    runner.kv[seq_id] = []


def files(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def harness(directory: str, model: str, **kw: object) -> tuple[Harness, StateRunner, DiskCache]:
    runner = StateRunner(**kw)
    h = Harness(runner)
    cache = open_cache(directory, runner, model)
    h.core.pool.disk = cache
    return h, runner, cache
