"""Stored responses: records, chains, input-item pages and retention, on every backend."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from lmserve.core.errors import LmserveError
from lmserve.stores import (
    NotFoundError, PageQuery, ResponseRecord, Retention, RetentionPolicy, Store,
)
from lmserve.stores.records import Order, page_items
from tests.stores.conftest import FakeClock, OpenStore


def message(item_id: str, role: str = "user", text: str = "hi") -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": item_id, "type": "message", "role": role,
            "content": [{"type": kind, "text": text}]}


def record(rid: str, new_input: list[dict[str, Any]], *,
           previous: ResponseRecord | None = None, status: str = "completed") -> ResponseRecord:
    """A response built the way the caller must: resolved input = previous conversation + new."""
    history = previous.conversation() if previous else []
    output = [message(f"msg_out_{rid}", "assistant", f"answer {rid}")]
    return ResponseRecord(
        id=rid, created_at=1_700_000_000.0, model="smollm2",
        input_items=[*history, *new_input],
        response={"id": rid, "object": "response", "status": status, "output": output},
        previous_response_id=previous.id if previous else None, metadata={"topic": "test"})


async def chain_of_three(store: Store) -> list[ResponseRecord]:
    r1 = record("resp_1", [message("msg_1", text="first")])
    r2 = record("resp_2", [{"id": "fco_2", "type": "function_call_output", "call_id": "c1",
                            "output": "42"}], previous=r1)
    r3 = record("resp_3", [message("msg_3", text="third")], previous=r2)
    for r in (r1, r2, r3):
        await store.responses.put(r)
    return [r1, r2, r3]


async def test_put_then_get_returns_an_equal_record(store: Store) -> None:
    r1 = record("resp_1", [message("msg_1", text="h\u00e9llo \U0001f600")])
    await store.responses.put(r1)
    assert await store.responses.get("resp_1") == r1
    assert await store.responses.get("resp_unknown") is None


async def test_the_owner_key_name_is_kept_and_replaced_with_the_record(store: Store) -> None:
    owned = dataclasses.replace(record("resp_1", [message("msg_1")]), owner="ci")
    await store.responses.put(owned)
    assert await store.responses.get("resp_1") == owned
    await store.responses.put(dataclasses.replace(owned, owner=None))  # replaced: owner too
    stored = await store.responses.get("resp_1")
    assert stored is not None and stored.owner is None


async def test_the_store_keeps_its_own_copy(store: Store) -> None:
    r1 = record("resp_1", [message("msg_1")])
    await store.responses.put(r1)
    r1.input_items.append(message("msg_sneaky"))
    r1.response["status"] = "mutated"
    stored = await store.responses.get("resp_1")
    assert stored is not None
    assert len(stored.input_items) == 1 and stored.response["status"] == "completed"


async def test_put_again_replaces_the_record(store: Store) -> None:
    await store.responses.put(record("resp_1", [message("msg_1")], status="in_progress"))
    await store.responses.put(record("resp_1", [message("msg_1")], status="completed"))
    stored = await store.responses.get("resp_1")
    assert stored is not None and stored.response["status"] == "completed"


async def test_chain_walks_previous_response_ids_oldest_first(store: Store) -> None:
    records = await chain_of_three(store)
    assert await store.responses.chain("resp_3") == records
    last_two = await store.responses.chain("resp_3", max_depth=2)
    assert [r.id for r in last_two] == ["resp_2", "resp_3"]
    assert await store.responses.chain("resp_unknown") == []


async def test_deleting_a_middle_response_keeps_later_ones_whole(store: Store) -> None:
    r1, r2, r3 = await chain_of_three(store)
    assert await store.responses.delete("resp_2") is True
    assert await store.responses.delete("resp_2") is False
    assert await store.responses.get("resp_2") is None
    stored = await store.responses.get("resp_3")
    assert stored == r3
    # resp_3 alone still yields the whole conversation, the deleted turn included
    ids = [item["id"] for item in stored.conversation()]
    assert ids == ["msg_1", "msg_out_resp_1", "fco_2", "msg_out_resp_2", "msg_3", "msg_out_resp_3"]
    assert await store.responses.chain("resp_3") == [r3]


async def test_input_items_pages_match_openai_cursor_semantics(store: Store) -> None:
    items = [message(f"msg_{i}") for i in range(5)]
    await store.responses.put(record("resp_1", items))
    page = await store.responses.input_items("resp_1", PageQuery(limit=2))
    assert [i["id"] for i in page.data] == ["msg_4", "msg_3"]  # desc is the default
    assert (page.first_id, page.last_id, page.has_more) == ("msg_4", "msg_3", True)
    page = await store.responses.input_items("resp_1", PageQuery(after="msg_3", limit=2))
    assert [i["id"] for i in page.data] == ["msg_2", "msg_1"] and page.has_more
    page = await store.responses.input_items("resp_1", PageQuery(after="msg_1", limit=2))
    assert [i["id"] for i in page.data] == ["msg_0"] and not page.has_more
    page = await store.responses.input_items("resp_1", PageQuery(order="asc", limit=20))
    assert page.data == items and not page.has_more
    page = await store.responses.input_items("resp_1", PageQuery(order="asc", before="msg_3",
                                                                 limit=2))
    assert [i["id"] for i in page.data] == ["msg_1", "msg_2"] and page.has_more


async def test_every_page_agrees_with_the_reference_paginator(store: Store) -> None:
    items = [message(f"msg_{i}") for i in range(7)]
    await store.responses.put(record("resp_1", items))
    cursors = [None, "msg_0", "msg_3", "msg_6"]
    orders: tuple[Order, ...] = ("asc", "desc")
    for order, limit, after, before in itertools.product(orders, (1, 3, 7, 100), cursors, cursors):
        if after is not None and before is not None:
            continue
        query = PageQuery(after=after, before=before, limit=limit, order=order)
        assert await store.responses.input_items("resp_1", query) == page_items(items, query), query


async def test_input_items_refuses_bad_requests(store: Store) -> None:
    await store.responses.put(record("resp_1", [message("msg_1")]))
    with pytest.raises(LmserveError) as err:
        await store.responses.input_items("resp_1", PageQuery(after="msg_nope"))
    assert err.value.param == "after" and err.value.kind.http_status == 400
    with pytest.raises(NotFoundError):
        await store.responses.input_items("resp_nope")
    for bad in ({"limit": 0}, {"limit": 101}, {"order": "up"}, {"after": "a", "before": "b"}):
        with pytest.raises(LmserveError):
            PageQuery(**bad)  # type: ignore[arg-type]


async def test_responses_expire_after_the_ttl_from_their_first_put(open_test_store: OpenStore,
                                                                    clock: FakeClock) -> None:
    store = await open_test_store(RetentionPolicy(responses=Retention(ttl=100)))
    await store.responses.put(record("resp_1", [message("msg_1")], status="in_progress"))
    clock.advance(60)
    await store.responses.put(record("resp_1", [message("msg_1")]))  # keeps the first expiry
    clock.advance(39)
    assert await store.responses.get("resp_1") is not None
    clock.advance(2)
    assert await store.responses.get("resp_1") is None
    with pytest.raises(NotFoundError):
        await store.responses.input_items("resp_1")


async def test_cap_evicts_oldest_and_children_stay_whole(open_test_store: OpenStore) -> None:
    store = await open_test_store(RetentionPolicy(responses=Retention(max_entries=2)))
    r1, r2, r3 = await chain_of_three(store)
    assert await store.responses.get("resp_1") is None
    assert await store.responses.get("resp_2") == r2
    assert await store.responses.get("resp_3") == r3
    assert await store.responses.chain("resp_3") == [r2, r3]


async def test_replacing_a_record_keeps_its_place_in_the_eviction_order(
        open_test_store: OpenStore) -> None:
    store = await open_test_store(RetentionPolicy(responses=Retention(max_entries=2)))
    await store.responses.put(record("resp_a", [message("msg_a")]))
    await store.responses.put(record("resp_b", [message("msg_b")]))
    await store.responses.put(record("resp_a", [message("msg_a")], status="incomplete"))
    await store.responses.put(record("resp_c", [message("msg_c")]))
    assert await store.responses.get("resp_a") is None
    assert await store.responses.get("resp_b") is not None


async def test_purge_counts_expired_responses(open_test_store: OpenStore,
                                              clock: FakeClock) -> None:
    store = await open_test_store(RetentionPolicy(responses=Retention(ttl=10)))
    await chain_of_three(store)
    clock.advance(11)
    assert await store.responses.purge() == 3
