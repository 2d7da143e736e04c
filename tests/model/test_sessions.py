"""Sessions pin their KV (engine.prefix_cache): SGLang's /open_session turns and oLLM's
/v1/sessions turns continue from the session's resident KV after unrelated traffic that evicts
it once the session is closed. A small server: 2 running slots and 1 cache slot, so three
unrelated requests cycle every slot that is not pinned."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.model.conftest import Server, own_server

GREEDY = {"temperature": 0, "max_new_tokens": 6}
# Long enough to be shared by copy under either KV layout (split streams copy 16 tokens or more).
STORY = ("The lighthouse keeper climbed the stairs every evening at dusk, counted the ships in "
         "the bay, and wrote their names in a small green book. One night")
SYSTEM = ("You keep the harbour log. Ships arrive from the north at dawn and leave for the "
          "south at dusk; answer in one short sentence.")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("sessions-data")
    yield from own_server(tmp_path_factory, "sessions", "smollm2", "--parallel", "2",
                          "--cache-slots", "1", "--ctx", "1024", "--threads", "2",
                          "--data-dir", str(data))


@pytest.fixture()
def http(small: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small.url, timeout=300) as c:
        yield c


def generate(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


# Each unrelated prompt starts with its own word, so none shares a prefix with another.
OPENINGS = iter(["Apples", "Bread", "Copper", "Dolphins", "Eagles", "Ferns", "Glaciers",
                 "Honey", "Iron", "Jasmine", "Kites", "Lemons", "Marble", "Nickel", "Oak",
                 "Pepper", "Quartz", "Rivers", "Saturn", "Umbrellas", "Violins", "Wolves",
                 "Yaks", "Zebras"])


def traffic(http: httpx.Client) -> None:
    """Unrelated requests, one more than the slots a pinned session leaves to others."""
    for _ in range(3):
        generate(http, text=f"{next(OPENINGS)} are known for",
                 sampling_params={"temperature": 0, "max_new_tokens": 2})


def refused(r: httpx.Response, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["message"]
    return error


def test_sglang_session_turns_continue_from_pinned_kv(http):
    sid = http.post("/open_session", json={"capacity_of_str_len": 1000}).json()
    assert isinstance(sid, str) and sid
    refused(http.post("/open_session", json={"capacity_of_str_len": 1000, "session_id": sid}))
    first = generate(http, text=STORY, session_params={"id": sid}, sampling_params=GREEDY)
    m1 = first["meta_info"]
    p1, c1 = m1["prompt_tokens"], m1["completion_tokens"]
    assert p1 > 16 and c1 == 6
    traffic(http)
    second = generate(http, text=" the keeper saw", session_params={"id": sid, "rid": m1["id"]},
                      sampling_params=GREEDY)
    m2 = second["meta_info"]
    new_tokens = m2["prompt_tokens"] - p1 - c1
    assert new_tokens > 0  # turn 2's prompt is turn 1's prompt and output, then its own text
    assert m2["cached_tokens"] == p1 + c1 - 1  # all but turn 1's last, never-decoded token
    # A plain request that shares the session's prefix copies it from the pinned slot.
    traffic(http)
    assert generate(http, text=STORY, sampling_params=GREEDY)["meta_info"][
        "cached_tokens"] == p1 - 1

    # Branches: replacing turn 1's continuation drops turn 2, which can no longer be continued.
    branch = generate(http, text=" a gull", sampling_params=GREEDY,
                      session_params={"id": sid, "rid": m1["id"], "replace": True})
    assert branch["meta_info"]["cached_tokens"] >= p1
    error = refused(http.post("/generate", json={
        "text": " again", "session_params": {"id": sid, "rid": m2["id"]}}))
    assert error["param"] == "session_params.rid"
    # drop_previous_output and offset cut the history, as SGLang's do.
    dropped = generate(http, text=" X", sampling_params=GREEDY, session_params={
        "id": sid, "rid": m1["id"], "drop_previous_output": True})
    assert dropped["meta_info"]["prompt_tokens"] == p1 + 1 or \
        dropped["meta_info"]["prompt_tokens"] == p1 + 2  # " X": one or two tokens
    cut = generate(http, input_ids=[28], sampling_params=GREEDY,
                   session_params={"id": sid, "rid": m1["id"], "offset": 5})
    assert cut["meta_info"]["prompt_tokens"] == 6

    # Close: aborts nothing here, releases the pin; the session is gone for good.
    assert http.post("/close_session", json={"session_id": sid}).status_code == 200
    error = refused(http.post("/generate", json={
        "text": "x", "session_params": {"id": sid, "rid": m1["id"]}}))
    assert "closed" in error["message"]
    refused(http.post("/close_session", json={"session_id": sid}))
    traffic(http)  # unpinned, the session's KV is evicted like any other
    assert generate(http, text=STORY, sampling_params=GREEDY)["meta_info"][
        "cached_tokens"] < p1 - 1


def test_sglang_session_errors(http):
    error = refused(http.post("/generate", json={"text": "x", "session_params": {"id": "nope"}}))
    assert "does not exist" in error["message"] and error["param"] == "session_params.id"
    sid = http.post("/open_session", json={"capacity_of_str_len": 8,
                                           "session_id": "tiny"}).json()
    assert sid == "tiny"
    error = refused(http.post("/generate", json={"text": STORY, "session_params": {"id": sid}}))
    assert "capacity_of_str_len" in error["message"]
    refused(http.post("/generate", json={"text": "x", "session_params": {"id": sid,
                                                                        "rid": "missing"}}))
    refused(http.post("/generate", json={"text": "x", "session_params": {"id": sid,
                                                                        "bogus": 1}}))
    refused(http.post("/generate", json={"text": ["a", "b"], "session_params": {"id": sid}}))
    refused(http.post("/open_session", json={}))
    assert http.post("/close_session", json={"session_id": sid}).status_code == 200


def ollm_prompt(http: httpx.Client, path: str, prompt: str, **extra: Any) -> dict[str, int]:
    r = http.post(path, json={"prompt": prompt, "generation": GREEDY, **extra})
    assert r.status_code == 200, r.text
    usage: dict[str, int] = r.json()["usage"]
    return usage


def test_ollm_session_kv_is_pinned_until_the_session_is_deleted(http):
    sid = http.post("/v1/sessions", json={"system_prompt": SYSTEM,
                                          "generation": GREEDY}).json()["session_id"]
    u1 = ollm_prompt(http, f"/v1/sessions/{sid}/prompt", "When do ships arrive?")
    traffic(http)
    u2 = ollm_prompt(http, f"/v1/sessions/{sid}/prompt", "And when do they leave?")
    assert u2["cached_tokens"] >= u1["prompt_tokens"]  # turn 1 whole, after the traffic
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    traffic(http)
    # The same opening as a one-shot prompt: the deleted session's KV was evicted.
    again = ollm_prompt(http, "/v1/prompt", "When do ships arrive?", system_prompt=SYSTEM)
    assert again["prompt_tokens"] == u1["prompt_tokens"]
    assert again["cached_tokens"] < u1["prompt_tokens"] - 1
