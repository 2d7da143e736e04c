"""The load manager's decisions without a model: each ManagedModel's service loads and unloads
by flipping its state, and a model is busy while it holds an (embedding) request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.lifecycle import ModelLoading
from lmserve.models.library import LibraryEntry
from lmserve.models.managed import LoadManager, ManagedModel
from lmserve.service import EngineSettings


def fake(manager: LoadManager, name: str, size: int = 100) -> ManagedModel:
    model = ManagedModel(LibraryEntry(name, f"/models/{name}.gguf", "dir", size_bytes=size),
                         EngineSettings(), manager)

    def load(loop: object, progress: object = None) -> None:
        model.service.state = "ready"

    def unload() -> None:
        model.service.state = "pending"

    model.service.load = load  # type: ignore[method-assign]
    model.service.unload = unload  # type: ignore[method-assign]
    manager.add(model)
    return model


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


async def use(model: ManagedModel) -> None:
    """A request for the model: it loads (or joins the load) and is then used."""
    try:
        model.require_ready()
    except ModelLoading as loading:
        await loading.wait()
    model.require_ready()


async def until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def test_least_recently_used_idle_model_is_evicted() -> None:
    async def scenario() -> None:
        manager = LoadManager(max_loaded=2, keep_alive=-1)
        a, b, c = fake(manager, "a"), fake(manager, "b"), fake(manager, "c")
        await use(a)
        await use(b)
        await use(a)  # a is now the more recently used
        await use(c)
        assert (a.loaded, b.loaded, c.loaded) == (True, False, True)
        assert sum(m.admitted for m in manager.models) == 2
    run(scenario)


def test_a_busy_model_is_never_evicted_the_load_waits() -> None:
    async def scenario() -> None:
        manager = LoadManager(max_loaded=1, keep_alive=-1, load_timeout=60)
        a, b = fake(manager, "a"), fake(manager, "b")
        await use(a)
        a._embeddings = 1  # a request runs on a
        waiting = asyncio.ensure_future(use(b))
        await asyncio.sleep(0.05)
        assert a.loaded and not b.loaded and not waiting.done()
        assert b.card.status == "loading"  # asked for, waiting for room
        a._embeddings = 0
        a._ended()  # the request ended
        await waiting
        assert b.loaded and not a.loaded
    run(scenario)


def test_nothing_to_free_in_time_is_a_503_with_retry_after() -> None:
    async def scenario() -> None:
        manager = LoadManager(max_loaded=1, keep_alive=-1, load_timeout=0.2)
        a, b = fake(manager, "a"), fake(manager, "b")
        await use(a)
        a._embeddings = 1
        with pytest.raises(LmserveError) as err:
            await use(b)
        assert err.value.kind is ErrorKind.CAPACITY and err.value.retry_after
        assert err.value.code == "no_room_for_model" and "--max-loaded 1" in err.value.message
        assert a.loaded and b.card.status == "unloaded"  # b may be asked for again
    run(scenario)


def test_memory_budget() -> None:
    async def scenario() -> None:
        manager = LoadManager(memory_budget=250, keep_alive=-1)
        a, b, big = fake(manager, "a"), fake(manager, "b"), fake(manager, "big", size=300)
        await use(a)
        await use(b)
        assert a.loaded and b.loaded
        c = fake(manager, "c")
        await use(c)  # 300 > 250: the least recently used goes
        assert not a.loaded and b.loaded and c.loaded
        with pytest.raises(LmserveError) as err:
            await use(big)
        assert err.value.code == "model_too_large" and err.value.kind is ErrorKind.UNAVAILABLE
    run(scenario)


def test_keep_alive_zero_unloads_when_idle_and_forever_never() -> None:
    async def scenario() -> None:
        manager = LoadManager(keep_alive=-1)
        a = fake(manager, "a")
        await use(a)
        assert a.loaded and a.expires_at is None  # forever
        a.set_keep_alive(0)
        await until(lambda: not a.loaded)
        manager.keep_alive = 0.05
        await use(a)
        await until(lambda: not a.loaded)  # the server's keep-alive
    run(scenario)


def test_concurrent_requests_share_one_load() -> None:
    async def scenario() -> None:
        manager = LoadManager()
        a = fake(manager, "a")
        loads = 0
        original = a.service.load

        def counted(loop: object, progress: object = None) -> None:
            nonlocal loads
            loads += 1
            original(loop, progress)

        a.service.load = counted  # type: ignore[method-assign]
        await asyncio.gather(*(use(a) for _ in range(5)))
        assert loads == 1 and a.loaded
    run(scenario)


def test_a_failed_listing_entry_answers_its_reason() -> None:
    manager = LoadManager()
    broken = ManagedModel(LibraryEntry("x", "/x.gguf", "dir", error="/x.gguf is not a GGUF file"),
                          EngineSettings(), manager)
    with pytest.raises(LmserveError) as err:
        broken.require_ready()
    assert err.value.code == "model_load_failed" and err.value.kind.http_status == 503
    assert broken.card.status == "failed" and broken.healthy
