"""Graceful shutdown of a real `lmserve serve`: SIGTERM drains (readiness 503, liveness 200, new
requests 503 + Retry-After, running streams finish), the drain timeout cuts what still runs
with an error each stream shows (a native stream's stored frames keep it), and a second
signal exits at once."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.model.conftest import Server, start_server
from tests.model.sse import read_sse

P = "/models/smollm2/"
# Tokens of the stream running when the signal comes (ignore_eos): enough to outlast the
# checks made while it drains; the cut streams are longer still, as they must never finish.
DRAINED = 300
LONG = 1500


class Reader:
    """A streamed chat completion read in a thread; each SSE data payload lands in a queue."""

    def __init__(self, server: Server, max_tokens: int) -> None:
        self.lines: queue.Queue[object] = queue.Queue()
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count."}],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True}
        self.thread = threading.Thread(target=self._read, args=(server.url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                              timeout=600) as response:
                self.lines.put(response.status_code)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.lines.put(data if data == "[DONE]" else json.loads(data))
        except httpx.HTTPError as exc:
            self.lines.put(exc)
        self.lines.put(None)

    def first_token(self) -> None:
        """Wait until the stream has started generating."""
        assert self.lines.get(timeout=300) == 200
        while True:
            item = self.lines.get(timeout=300)
            assert isinstance(item, dict), item
            if any(c["delta"].get("content") for c in item.get("choices", [])):
                return

    def rest(self) -> list[object]:
        """Everything else the stream sends, until it closes."""
        items = []
        while (item := self.lines.get(timeout=600)) is not None:
            items.append(item)
        return items


def wait_until(check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.1)


def status(server: Server, path: str) -> int:
    return httpx.get(f"{server.url}{path}", timeout=30).status_code


@pytest.fixture()
def data_dir(tmp_path) -> str:
    return str(tmp_path)


@contextlib.contextmanager
def serve(data_dir: str, *args: str) -> Iterator[Server]:
    server = start_server(data_dir, "smollm2", "--ctx", "2048", "--threads", "2",
                          "--data-dir", data_dir, *args)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)


def test_sigterm_drains_running_streams_refuses_new_requests_and_exits_0(data_dir):
    with serve(data_dir, "--parallel", "2", "--drain-timeout", "600") as server:
        assert status(server, "/health/ready") == 200 and status(server, "/readyz") == 200
        assert status(server, "/health/live") == 200 and status(server, "/livez") == 200
        stream = Reader(server, DRAINED)
        stream.first_token()
        server.proc.send_signal(signal.SIGTERM)

        wait_until(lambda: status(server, "/health/ready") == 503)
        assert httpx.get(f"{server.url}/health/ready").json() == {"status": "draining"}
        assert status(server, "/health/live") == 200 and status(server, "/livez") == 200
        assert status(server, "/readyz") == 503

        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4})
        assert chat.status_code == 503 and int(chat.headers["Retry-After"]) >= 1
        error = chat.json()["error"]
        assert error["type"] == "service_unavailable_error" and error["code"] == "server_draining"
        anthropic = httpx.post(f"{server.url}/v1/messages", timeout=60, json={
            "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert anthropic.status_code == 503 and "Retry-After" in anthropic.headers
        assert anthropic.json()["error"]["type"] == "overloaded_error"
        native = httpx.post(f"{server.url}{P}stream/", json={"prompt": "hi"}, timeout=60)
        assert native.status_code == 503 and native.json()["error"]["type"] == "draining"

        rest = stream.rest()  # the running stream goes on to its end
        assert rest[-1] == "[DONE]"
        finals = [c for item in rest if isinstance(item, dict)
                  for c in item.get("choices", []) if c.get("finish_reason")]
        assert [c["finish_reason"] for c in finals] == ["length"]
        assert server.proc.wait(120) == 0, server.log()


def test_the_drain_timeout_cuts_streams_with_an_error_each_client_sees(data_dir):
    with serve(data_dir, "--parallel", "1", "--drain-timeout", "1") as server:
        stream = Reader(server, LONG)
        stream.first_token()
        # With one slot, the native stream waits behind the running chat: still unfinished
        # when the timeout comes.
        native = httpx.post(f"{server.url}{P}stream/", timeout=60, json={
            "prompt": "Tell a long story.", "params": {"max_tokens": 200}})
        assert native.status_code == 201, native.text
        ident = native.json()["id"]
        server.proc.send_signal(signal.SIGTERM)

        rest = stream.rest()
        errors = [item["error"] for item in rest if isinstance(item, dict) and "error" in item]
        assert errors and errors[0]["code"] == "draining", rest[-3:]
        assert errors[0]["type"] == "service_unavailable_error"
        assert "drain timeout" in errors[0]["message"]
        assert not any(c.get("finish_reason") == "length" for item in rest
                       if isinstance(item, dict) for c in item.get("choices", []))
        assert server.proc.wait(120) == 0, server.log()

    # Another process on the same store (as a replica would) reads the stored frames.
    with serve(data_dir, "--parallel", "1") as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            frames, _ = read_sse(http, f"{P}stream/{ident}/")
        events = [f.event for f in frames]
        assert events[0] == "message.start" and events[-2:] == ["error", "message.stop"]
        assert frames[-2].data["type"] == "draining"
        assert "drain timeout" in frames[-2].data["message"]
        assert frames[-1].data["stop_reason"] == "error"


def test_a_second_signal_exits_at_once(data_dir):
    with serve(data_dir, "--parallel", "1", "--drain-timeout", "600") as server:
        stream = Reader(server, LONG)
        stream.first_token()
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: status(server, "/health/ready") == 503)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == -signal.SIGTERM
        assert "exiting now" in server.log()
