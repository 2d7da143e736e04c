"""The native dialect over the backend contract: a choice that fails keeps its ErrorKind, so a
full KV cache (CAPACITY) is a 503 from query/ and an error frame of type "capacity" in a
stream/; the steps come parsed (reasoning shown only when asked for, raw transport included);
introspection reads the card; the dialect imports nothing of the engine or the service."""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.core.errors import ErrorKind
from lmserve.dialects.native import routes
from lmserve.dialects.native.producer import StreamProducers
from lmserve.models.resource import LLMResource
from lmserve.stores import StreamRetention
from lmserve.stores.memory import MemoryStreams
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedService, imports, script
from tests.unit.dialects.sglang.test_sglang_contract import FAILURE_STATUS, FULL, failing, scripted


@contextlib.contextmanager
def client_for(service: ScriptedService) -> Iterator[TestClient]:
    resource = LLMResource.for_service(service, "/m/")
    store = MemoryStreams(StreamRetention(), time.time)
    app = FastAPI()
    app.include_router(routes.make_router(resource, StreamProducers(lambda: store)),
                       prefix="/m")
    with TestClient(app) as client:  # one event loop: the producers outlive each request
        yield client


def stream_frames(client: TestClient, body: dict[str, Any]) -> list[tuple[str, Any]]:
    started = client.post("/m/stream/", json=body)
    assert started.status_code == 201
    text = client.get(f"/m/stream/{started.json()['id']}/").text
    out, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


@pytest.mark.parametrize("kind, status", FAILURE_STATUS)
def test_a_failed_choice_before_the_first_byte_has_its_kinds_status(kind, status):
    service = scripted(failing(kind, "it went wrong"))
    with client_for(service) as c:
        r = c.post("/m/query/", json={"prompt": "hi"})
    assert r.status_code == status
    assert r.json() == {"error": {"type": kind.value, "message": "it went wrong"}}
    assert service.started[0][2].closed


def test_a_full_kv_cache_in_a_stream_is_an_error_frame_with_its_kind():
    service = scripted(failing(ErrorKind.CAPACITY))
    with client_for(service) as c:
        frames = stream_frames(c, {"prompt": "hi"})
    names = [name for name, _ in frames]
    assert names == ["message.start", "block.start", "block.delta", "block.delta", "block.stop",
                     "error", "message.stop"]
    assert [d["text"] for n, d in frames if n == "block.delta"] == ["Hel", "lo"]
    assert frames[-2][1] == {"type": "capacity", "message": FULL}
    assert frames[-1][1]["stop_reason"] == "error"
    assert service.started[0][2].closed


@pytest.mark.parametrize("transport, reasoning", [
    ("chat", "Hmm.</think>"),  # the template's generation prompt opens the think block
    ("raw", "<think>Hmm.</think>"),  # a raw prompt does not: the model opens it
])
def test_reasoning_is_parsed_and_shown_only_when_asked(transport, reasoning):
    steps = script([reasoning, "Hi!"])
    body = {"prompt": "hi", "transport": transport}
    with client_for(scripted(steps, THINK_TEMPLATE)) as c:
        hidden = c.post("/m/query/", json=body).json()
        shown = c.post("/m/query/", json={**body, "params": {"reasoning": True}}).json()
        frames = stream_frames(c, {**body, "params": {"reasoning": True}})
    assert hidden["blocks"] == [{"type": "text", "channel": "output", "text": "Hi!"}]
    assert shown["blocks"] == [{"type": "text", "channel": "reasoning", "text": "Hmm."},
                               {"type": "text", "channel": "output", "text": "Hi!"}]
    assert hidden["stop_reason"] == "stop" and hidden["usage"]["output_tokens"] == 2
    assert [(d["channel"], d["text"]) for n, d in frames if n == "block.delta"] == [
        ("reasoning", "Hmm."), ("output", "Hi!")]


def test_introspection_reads_the_card():
    with client_for(scripted(script(["x"]))) as c:
        body = c.get("/m/").json()
    assert body["status"] == "ready"
    assert (body["model"]["context_length"], body["model"]["parameters"]) == (4096, 1234)
    assert body["model"]["chat_template"] is True and body["default_transport"] == "chat"


def test_the_dialect_imports_only_the_contract():
    """Routes encode: no engine, no ModelService, no GGUF header reads."""
    for file, module in imports(pathlib.Path(routes.__file__).parent):
        assert not module.startswith(("lmserve.engine", "lmserve.service",
                                      "lmserve.models.gguf_header")), (file, module)
