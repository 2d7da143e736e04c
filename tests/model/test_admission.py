"""Admission control of a real `lmserve serve`: --max-queued-tokens refuses a request whose
prompt would overflow the queue (429 + Retry-After), and `priority` orders the wait queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.model.conftest import Server, own_server

CAP = 60


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "admission", "smollm2", "--parallel", "1",
                          "--ctx", "2048", "--threads", "2", "--max-queued-tokens", str(CAP))


def wait_metric(server: Server, name: str, value: float, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metric(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def completion(server: Server, tokens: int, **fields) -> httpx.Response:
    body = {"model": "smollm2", "prompt": [1000 + i for i in range(tokens)], "max_tokens": 2,
            "temperature": 0, **fields}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)


def _hold_the_slot(server: Server, rid: str) -> threading.Thread:
    """A request that holds the only slot until it is aborted."""
    blocker = threading.Thread(target=httpx.post, daemon=True, args=(f"{server.url}/generate",),
                               kwargs={"json": {"text": "Count.", "rid": rid,
                                                "sampling_params": {"max_new_tokens": 1500,
                                                                    "ignore_eos": True}},
                                       "timeout": 600})
    blocker.start()
    wait_metric(server, "lmserve_requests_running", 1)
    return blocker


def test_priority_orders_the_queue_and_queued_prompt_tokens_are_capped(one_slot):
    server = one_slot
    blocker = _hold_the_slot(server, "blocker")

    finished: list[str] = []

    def queued(name: str, tokens: int, priority: int) -> threading.Thread:
        def run() -> None:
            response = completion(server, tokens, priority=priority)
            assert response.status_code == 200, response.text
            finished.append(name)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    later = queued("later", 40, priority=5)
    wait_metric(server, "lmserve_requests_waiting", 1)

    refused = completion(server, 30)  # 40 + 30 prompt tokens would wait: over the cap
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded"
    assert "prompt tokens queued" in error["message"]

    sooner = queued("sooner", 10, priority=-1)  # 50 tokens: within the cap
    wait_metric(server, "lmserve_requests_waiting", 2)

    aborted = httpx.post(f"{server.url}/abort_request", json={"rid": "blocker"}, timeout=60)
    assert aborted.status_code == 200, aborted.text
    for thread in (later, sooner, blocker):
        thread.join(600)
    assert finished == ["sooner", "later"]


@pytest.mark.parametrize("value", [True, 1.5, "1", 2**40])
def test_a_priority_that_is_not_an_integer_is_a_400_naming_it(one_slot, value):
    response = completion(one_slot, 3, priority=value)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "priority"


# `priority` in the native protocol, oLLM (in `generation`) and Responses; short prompts so
# that all of them wait together within the module server's --max-queued-tokens.
PRIORITIZED = {
    "native": ("/models/smollm2/query/", lambda p: {
        "transport": "raw", "prompt": "Hi", "params": {"max_tokens": 2}, "priority": p}),
    "ollm": ("/v1/prompt", lambda p: {
        "prompt": "Hi", "system_prompt": "Be brief.",
        "generation": {"max_new_tokens": 2, "priority": p}}),
    "responses": ("/v1/responses", lambda p: {
        "model": "smollm2", "input": "Hi", "instructions": "Be brief.",
        "max_output_tokens": 2, "store": False, "priority": p}),
}


def test_priority_reaches_admission_from_native_ollm_and_responses(one_slot):
    server = one_slot
    blocker = _hold_the_slot(server, "blocker-dialects")
    finished: list[str] = []

    def queued(name: str, path: str, body: dict) -> threading.Thread:
        def run() -> None:
            response = httpx.post(f"{server.url}{path}", json=body, timeout=600)
            assert response.status_code == 200, response.text
            finished.append(name)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    body = {"model": "smollm2", "prompt": [1000 + i for i in range(8)], "max_tokens": 2,
            "temperature": 0, "priority": 5}
    threads = [queued("openai", "/v1/completions", body)]
    wait_metric(server, "lmserve_requests_waiting", 1)
    for waiting, (name, priority) in enumerate((("native", -1), ("ollm", -2),
                                               ("responses", -3)), start=2):
        path, make = PRIORITIZED[name]
        threads.append(queued(name, path, make(priority)))
        wait_metric(server, "lmserve_requests_waiting", waiting)

    aborted = httpx.post(f"{server.url}/abort_request", json={"rid": "blocker-dialects"},
                         timeout=60)
    assert aborted.status_code == 200, aborted.text
    for thread in (*threads, blocker):
        thread.join(600)
    assert finished == ["responses", "ollm", "native", "openai"]


@pytest.mark.parametrize("dialect", sorted(PRIORITIZED))
def test_a_priority_that_is_not_an_integer_is_refused_in_each_dialect(one_slot, dialect):
    path, make = PRIORITIZED[dialect]
    response = httpx.post(f"{one_slot.url}{path}", json=make("1"), timeout=60)
    if dialect == "ollm":  # oLLM's own shape for a bad field: FastAPI's 422 with its location
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][-2:] == ["generation", "priority"]
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "priority", response.text
