"""The Responses WebSocket and a model that is not loaded: a response.create waits for the
load and then runs (as an HTTP request does), a failed load is an error event in the
WebSocket's shape on a connection that stays open, and a client that leaves during the load
stops only its own wait. The load is scripted (core.lifecycle.ModelLoading's wait); the
real load on demand is tested in tests/model/test_library.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi.testclient import TestClient

from lmserve.core.backend import PreparedPrompt
from lmserve.core.lifecycle import ModelLoading, load_failed
from tests.unit.dialects.anthropic.test_anthropic import STEPS
from tests.unit.dialects.openai.responses.test_responses_routes import Service, make_app

ASK = {"type": "response.create", "model": "m", "input": "hi"}


class Loading(Service):
    """Not loaded until `loads` waits have run; each wait is what the test scripts."""

    def __init__(self, wait: Any) -> None:
        super().__init__(STEPS)
        self.loaded = False
        self.waits = 0
        self._wait = wait

    def prepare(self, gen: Any) -> PreparedPrompt:
        if not self.loaded:
            raise ModelLoading("m", self.wait)
        return super().prepare(gen)

    async def wait(self) -> None:
        self.waits += 1
        await self._wait(self)


def events_of(ws: Any) -> list[dict[str, Any]]:
    events = [ws.receive_json()]
    while events[-1]["type"] not in ("error", "response.completed", "response.failed",
                                     "response.incomplete"):
        events.append(ws.receive_json())
    return events


def test_a_turn_waits_for_its_models_load() -> None:
    async def load(service: Loading) -> None:
        await asyncio.sleep(0)
        service.loaded = True

    service = Loading(load)
    with TestClient(make_app(service)[0]) as client, \
            client.websocket_connect("/v1/responses") as ws:
        ws.send_json(ASK)
        events = events_of(ws)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert service.waits == 1 and len(service.started) == 1


def test_a_failed_load_is_an_error_event_and_the_connection_goes_on() -> None:
    async def fail(service: Loading) -> None:
        if service.waits == 1:
            raise load_failed("m", "not a GGUF file")
        service.loaded = True

    service = Loading(fail)
    with TestClient(make_app(service)[0]) as client, \
            client.websocket_connect("/v1/responses") as ws:
        ws.send_json(ASK)
        error = events_of(ws)
        ws.send_json(ASK)
        after = events_of(ws)
    assert error == [{"type": "error", "status": 503, "error": error[0]["error"]}]
    assert error[0]["error"]["code"] == "model_load_failed"
    assert "could not be loaded: not a GGUF file" in error[0]["error"]["message"]
    assert after[-1]["type"] == "response.completed"


def test_a_client_that_leaves_during_the_load_ends_only_its_wait() -> None:
    waiting, stopped = threading.Event(), threading.Event()

    async def forever(service: Loading) -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.set()
            raise

    service = Loading(forever)
    with TestClient(make_app(service)[0]) as client:
        with client.websocket_connect("/v1/responses") as ws:
            ws.send_json(ASK)
            assert waiting.wait(30)
        assert stopped.wait(30)  # the wait ended when the client left; nothing started
        assert service.started == []


def test_a_message_sent_during_the_load_is_served_next() -> None:
    gate = threading.Event()

    async def gated(service: Loading) -> None:
        await asyncio.to_thread(gate.wait, 30)
        service.loaded = True

    service = Loading(gated)
    with TestClient(make_app(service)[0]) as client, \
            client.websocket_connect("/v1/responses") as ws:
        ws.send_json({**ASK, "metadata": {"n": "1"}})
        ws.send_json({**ASK, "metadata": {"n": "2"}})  # read ahead while the first waits
        gate.set()
        first, second = events_of(ws), events_of(ws)
    assert first[-1]["type"] == second[-1]["type"] == "response.completed"
    assert [first[-1]["response"]["metadata"], second[-1]["response"]["metadata"]] == \
        [{"n": "1"}, {"n": "2"}]
