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


def test_priority_orders_the_queue_and_queued_prompt_tokens_are_capped(one_slot):
    server = one_slot
    # A request that holds the only slot until it is aborted.
    blocker = threading.Thread(target=httpx.post, daemon=True, args=(f"{server.url}/generate",),
                               kwargs={"json": {"text": "Count.", "rid": "blocker",
                                                "sampling_params": {"max_new_tokens": 1500,
                                                                    "ignore_eos": True}},
                                       "timeout": 600})
    blocker.start()
    wait_metric(server, "lmserve_requests_running", 1)

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
