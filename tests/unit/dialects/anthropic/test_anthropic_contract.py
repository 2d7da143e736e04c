"""The Anthropic dialect over the backend contract: a choice that fails keeps its ErrorKind, so
a full KV cache (CAPACITY) is a 503 overloaded_error before the first byte and an in-stream
overloaded_error event after it; the dialect imports nothing of the engine or the service."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.core.errors import ErrorKind
from lmserve.core.events import TokenOutput, Usage
from lmserve.dialects.anthropic import routes
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedRegistry, ScriptedService, imports
from tests.unit.dialects.anthropic.test_anthropic import parse_sse

FULL = "the model's KV cache is full; retry shortly"
REQUEST = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi?"}]}


def failing(kind: ErrorKind, message: str = FULL) -> list[list[TokenOutput]]:
    """Reasoning, an answer, then the choice fails (its last text never reaches the client)."""
    return [[TokenOutput(0, "Hmm.</think>", token_ids=[1])],
            [TokenOutput(0, "Hello", token_ids=[2])],
            [TokenOutput(0, " there", token_ids=[3], finish_reason="error", error=message,
                         error_kind=kind, usage=Usage(5, 3))]]


def client_for(steps: list[list[TokenOutput]], make_router: Any = routes.make_router
               ) -> tuple[TestClient, ScriptedService]:
    """A dialect's router over a scripted backend that answers with `steps`."""
    service = ScriptedService(steps, THINK_TEMPLATE)
    app = FastAPI()
    app.include_router(make_router(lambda: ScriptedRegistry(service)))
    return TestClient(app), service


@pytest.mark.parametrize("kind, status, error_type", [
    (ErrorKind.CAPACITY, 503, "overloaded_error"),
    (ErrorKind.UPSTREAM, 502, "api_error"),
    (ErrorKind.UPSTREAM_TIMEOUT, 504, "api_error"),
    (ErrorKind.INTERNAL, 500, "api_error"),
])
def test_a_failed_choice_before_the_first_byte_has_its_kinds_status(kind, status, error_type):
    client, service = client_for(failing(kind, "it went wrong"))
    r = client.post("/v1/messages", json=REQUEST)
    assert r.status_code == status
    assert r.json() == {"type": "error", "error": {"type": error_type,
                                                   "message": "it went wrong"}}
    assert service.started[0][2].closed


def test_a_full_kv_cache_after_the_first_byte_is_an_overloaded_error_event():
    client, service = client_for(failing(ErrorKind.CAPACITY))
    r = client.post("/v1/messages", json={**REQUEST, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.content)
    names = [e for e, _ in events]
    assert names[0] == "message_start" and "message_stop" not in names
    assert names[-1] == "error" and events[-1][1] == {
        "type": "error", "error": {"type": "overloaded_error", "message": FULL}}
    # What streamed before the failure was parsed (thinking, then text); the failing step's
    # text is dropped with it.
    deltas = [d["delta"] for e, d in events if e == "content_block_delta"]
    assert {"type": "text_delta", "text": "Hello"} in deltas
    assert not any(" there" in str(d) for d in deltas)
    assert service.started[0][2].closed


def engine_imports(package: pathlib.Path) -> list[tuple[str, str]]:
    """(file, module) for each import in a dialect's package of what routes may not use: the
    engine, ModelService, GGUF header reads (a served model's facts come from its card)."""
    return sorted((file, module) for file, module in imports(package) if module.startswith(
        ("lmserve.engine", "lmserve.service", "lmserve.models.gguf_header")))


def test_the_dialect_imports_only_the_contract():
    assert engine_imports(pathlib.Path(routes.__file__).parent) == []
