"""In-process wake-ups for stream followers (memory and SQLite backends)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager


class Notifier:
    """Futures keyed by stream id, resolved when that stream changes.

    A waiter registers *before* it checks the store, so a change that lands between the
    check and the await still wakes it: no lost wake-up, no busy loop.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    @contextmanager
    def listen(self, key: str) -> Iterator[asyncio.Future[None]]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        try:
            yield future
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[key]

    def notify(self, key: str) -> None:
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result(None)


async def wait_for_change(notifier: Notifier, key: str, ready: Callable[[], Awaitable[bool]],
                          timeout: float | None, poll: float | None) -> bool:
    """True once `ready()` holds, re-checked on every notification and every `poll` seconds
    (the poll catches writers in other processes); False when `timeout` runs out first."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        with notifier.listen(key) as changed:
            if await ready():
                return True
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.wait({changed}, timeout=_shorter(remaining, poll))


def _shorter(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
