"""Sessions and their transcripts, the same tests on every backend."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.core.errors import LmserveError
from lmserve.stores import ConflictError, NotFoundError, Retention, RetentionPolicy, Store
from tests.stores.conftest import FakeClock, OpenStore


def turn(text: str, role: str = "user") -> dict[str, str]:
    return {"role": role, "content": text}


async def test_create_then_get_an_empty_session(store: Store, clock: FakeClock) -> None:
    created = await store.sessions.create("sess_1", model="smollm2", system="Be brief.",
                                          metadata={"user": "ana"})
    fetched = await store.sessions.get("sess_1")
    assert fetched == created
    assert (fetched.model, fetched.system, fetched.metadata) == ("smollm2", "Be brief.",
                                                                 {"user": "ana"})
    assert (fetched.created_at, fetched.message_count, fetched.messages) == (clock.now, 0, [])
    assert await store.sessions.get("sess_unknown") is None


async def test_a_session_without_system_prompt_keeps_none(store: Store) -> None:
    await store.sessions.create("sess_1", model="m")
    fetched = await store.sessions.get("sess_1")
    assert fetched is not None and fetched.system is None and fetched.metadata == {}


async def test_create_twice_conflicts(store: Store) -> None:
    await store.sessions.create("sess_1", model="m")
    with pytest.raises(ConflictError):
        await store.sessions.create("sess_1", model="m")


async def test_appends_keep_their_order(store: Store, clock: FakeClock) -> None:
    await store.sessions.create("sess_1", model="m")
    await store.sessions.append("sess_1", [turn("hello"), turn("hi there", "assistant")])
    clock.advance(5)
    info = await store.sessions.append("sess_1", [turn("how are you?")])
    assert (info.message_count, info.updated_at) == (3, clock.now)
    info = await store.sessions.append("sess_1", [turn("fine", "assistant")])
    fetched = await store.sessions.get("sess_1")
    assert fetched is not None
    assert [m["content"] for m in fetched.messages] == ["hello", "hi there", "how are you?", "fine"]
    assert fetched.message_count == info.message_count == 4


async def test_concurrent_appends_never_interleave(store: Store) -> None:
    await store.sessions.create("sess_1", model="m")
    await asyncio.gather(*(
        store.sessions.append("sess_1", [turn(f"{batch}.{i}") for i in range(3)])
        for batch in range(10)))
    fetched = await store.sessions.get("sess_1")
    assert fetched is not None
    contents = [m["content"] for m in fetched.messages]
    assert len(contents) == 30
    for start in range(0, 30, 3):
        batch = contents[start].split(".")[0]
        assert contents[start:start + 3] == [f"{batch}.{i}" for i in range(3)]
    assert sorted({c.split(".")[0] for c in contents}) == sorted(str(b) for b in range(10))


async def test_append_refuses_unknown_sessions_and_bad_messages(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.sessions.append("sess_nope", [turn("hi")])
    await store.sessions.create("sess_1", model="m")
    for bad in ([], [{"content": "no role"}], ["just text"]):
        with pytest.raises(LmserveError):
            await store.sessions.append("sess_1", bad)  # type: ignore[arg-type]
    fetched = await store.sessions.get("sess_1")
    assert fetched is not None and fetched.messages == []


async def test_get_without_messages_still_counts_them(store: Store) -> None:
    await store.sessions.create("sess_1", model="m")
    await store.sessions.append("sess_1", [turn("a"), turn("b")])
    fetched = await store.sessions.get("sess_1", messages=False)
    assert fetched is not None and fetched.messages == [] and fetched.message_count == 2


async def test_delete_drops_session_and_transcript(store: Store) -> None:
    await store.sessions.create("sess_1", model="m")
    await store.sessions.append("sess_1", [turn("a")])
    assert await store.sessions.delete("sess_1") is True
    assert await store.sessions.delete("sess_1") is False
    assert await store.sessions.get("sess_1") is None
    await store.sessions.create("sess_1", model="m")  # a new session under the same id starts empty
    fetched = await store.sessions.get("sess_1")
    assert fetched is not None and fetched.messages == []


async def test_recent_lists_the_most_recently_active_first(store: Store) -> None:
    for name in ("a", "b", "c"):
        await store.sessions.create(name, model="m")
    await store.sessions.append("a", [turn("x")])
    assert [s.id for s in await store.sessions.recent()] == ["a", "c", "b"]
    listed = await store.sessions.recent(limit=2)
    assert [(s.id, s.message_count) for s in listed] == [("a", 1), ("c", 0)]
    with pytest.raises(LmserveError):
        await store.sessions.recent(limit=0)


async def test_idle_sessions_expire_and_appends_keep_them_alive(open_test_store: OpenStore,
                                                                 clock: FakeClock) -> None:
    store = await open_test_store(RetentionPolicy(sessions=Retention(ttl=100)))
    await store.sessions.create("sess_1", model="m")
    clock.advance(90)
    await store.sessions.append("sess_1", [turn("still here")])
    clock.advance(90)
    assert await store.sessions.get("sess_1") is not None
    clock.advance(11)
    assert await store.sessions.get("sess_1") is None
    assert await store.sessions.recent() == []
    with pytest.raises(NotFoundError):
        await store.sessions.append("sess_1", [turn("too late")])


async def test_cap_evicts_the_least_recently_used(open_test_store: OpenStore) -> None:
    store = await open_test_store(RetentionPolicy(sessions=Retention(max_entries=2)))
    await store.sessions.create("a", model="m")
    await store.sessions.create("b", model="m")
    await store.sessions.append("a", [turn("keep me")])
    await store.sessions.create("c", model="m")
    assert await store.sessions.get("b") is None
    kept = await store.sessions.get("a")
    assert kept is not None and kept.messages == [turn("keep me")]
    assert await store.sessions.get("c") is not None


async def test_purge_counts_expired_sessions(open_test_store: OpenStore,
                                             clock: FakeClock) -> None:
    store = await open_test_store(RetentionPolicy(sessions=Retention(ttl=10)))
    await store.sessions.create("a", model="m")
    await store.sessions.create("b", model="m")
    clock.advance(11)
    assert await store.sessions.purge() == 2
