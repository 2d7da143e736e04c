"""OpenAI chat, completions and Responses over the backend contract: a failed choice keeps its
kind (a KV cache full is a 503, not a 500) both as the status before the first byte and as
the in-stream error after it; /v1/models and /v1/embeddings read the model's card."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.core.backend import LoadState, ModelCard, WeightsFacts
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.core.lora import LoraSpec
from lmserve.dialects.openai import encoder, routes
from lmserve.dialects.openai.responses.encoder import ResponseEvents
from tests.unit.chat_service import ScriptedRegistry, ScriptedService
from tests.unit.dialects.anthropic.test_anthropic import parse_sse
from tests.unit.dialects.openai.responses.test_responses_routes import make_app, until_final

FULL = "the model's KV cache is full; retry shortly"


def failing(kind: ErrorKind = ErrorKind.CAPACITY, message: str = FULL
            ) -> list[list[TokenOutput]]:
    """Some text, then the choice fails with `kind`."""
    return [[TokenOutput(0, "Hi", token_ids=[1])],
            [TokenOutput(0, "", finish_reason="error", error=message, error_kind=kind,
                         usage=Usage(prompt_tokens=3, completion_tokens=1))]]


def openai_client(steps: list[list[TokenOutput]]) -> TestClient:
    app = FastAPI()
    service = ScriptedService(steps, CHATML_TEMPLATE)
    app.include_router(routes.make_router(lambda: ScriptedRegistry(service)))  # type: ignore[arg-type]
    return TestClient(app)


@pytest.fixture()
def responses_client() -> Iterator[TestClient]:
    app, _ = make_app(ScriptedService(failing(), CHATML_TEMPLATE),  # type: ignore[arg-type]
                      registry=ScriptedRegistry)  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield client


def sse_data(raw: bytes) -> list[Any]:
    lines = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
CAPACITY_ERROR = {"message": FULL, "type": "service_unavailable_error", "param": None,
                  "code": "capacity"}


# ---- errors: every kind has an OpenAI type ------------------------------------------------------

def test_every_error_kind_has_a_type_and_its_status():
    for kind in ErrorKind:
        body = encoder.error_body(LmserveError(kind, "x"))
        assert body["error"]["type"].endswith("_error") and body["error"]["code"] == kind.value
    assert encoder.error_type(ErrorKind.CAPACITY) == "service_unavailable_error"
    assert encoder.error_type(ErrorKind.UPSTREAM) == "server_error"
    assert encoder.error_type(ErrorKind.UPSTREAM_TIMEOUT) == "server_error"


# ---- chat and completions ---------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", COMPLETION)])
def test_a_capacity_failure_before_the_first_byte_is_a_503(path, body):
    r = openai_client(failing()).post(path, json=body)
    assert r.status_code == 503, r.text
    assert r.json() == {"error": CAPACITY_ERROR}


@pytest.mark.parametrize("kind, status, kind_type", [
    (ErrorKind.INTERNAL, 500, "server_error"), (ErrorKind.UPSTREAM, 502, "server_error"),
    (ErrorKind.UPSTREAM_TIMEOUT, 504, "server_error")])
def test_other_failures_keep_their_status(kind, status, kind_type):
    r = openai_client(failing(kind, "it broke")).post("/v1/chat/completions", json=CHAT)
    assert r.status_code == status
    assert r.json()["error"] == {"message": "it broke", "type": kind_type, "param": None,
                                 "code": kind.value}


def test_a_capacity_failure_in_a_chat_stream_is_an_error_chunk():
    r = openai_client(failing()).post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    chunks = sse_data(r.content)
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert chunks[-1] == {"error": CAPACITY_ERROR}


def test_a_capacity_failure_in_a_completion_stream_is_an_error_chunk():
    r = openai_client(failing()).post("/v1/completions", json={**COMPLETION, "stream": True})
    chunks = sse_data(r.content)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["Hi"]
    assert chunks[-1] == {"error": CAPACITY_ERROR}


def test_held_back_text_of_a_failed_choice_is_not_sent():
    """The parser held "<" (a tool call may start there); the failure drops it."""
    steps = [[TokenOutput(0, "Hi <", token_ids=[1])], *failing()[1:]]
    r = openai_client(steps).post("/v1/chat/completions", json={**CHAT, "stream": True,
                                  "tools": [{"type": "function", "function": {"name": "f"}}]})
    chunks = sse_data(r.content)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert "<" not in text and chunks[-1] == {"error": CAPACITY_ERROR}


# ---- Responses ----------------------------------------------------------------------------------

def test_responses_capacity_failure_before_the_first_byte_is_a_503(responses_client):
    r = responses_client.post("/v1/responses", json={"model": "m", "input": "hi"})
    assert r.status_code == 503
    assert r.json() == {"error": CAPACITY_ERROR}


def test_responses_capacity_failure_in_the_stream(responses_client):
    r = responses_client.post("/v1/responses", json={"model": "m", "input": "hi",
                                                     "stream": True})
    events = parse_sse(r.content)
    assert [name for name, _ in events][-2:] == ["error", "response.failed"]
    error = events[-2][1]
    assert (error["code"], error["message"]) == ("service_unavailable_error", FULL)
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["output_text"] == "Hi"
    assert failed["error"] == {"code": "server_error", "message": FULL}  # the API's code list
    assert responses_client.get(f"/v1/responses/{failed['id']}").json() == failed


def test_responses_capacity_failure_over_the_websocket(responses_client):
    with responses_client.websocket_connect("/v1/responses") as ws:
        ws.send_json({"type": "response.create", "model": "m", "input": "hi"})
        events = until_final(ws)
    assert events[-2] == {"type": "error", "error": {
        "type": "service_unavailable_error", "code": "service_unavailable_error",
        "message": FULL, "param": None}, "sequence_number": events[-2]["sequence_number"]}
    assert events[-1]["type"] == "response.failed"


def test_responses_a_generation_cancelled_on_the_server_fails_retryably():
    app, _ = make_app(ScriptedService([[TokenOutput(0, "Hi", token_ids=[1])],  # type: ignore[arg-type]
                                       [TokenOutput(0, "", finish_reason="cancelled")]],
                                      CHATML_TEMPLATE), registry=ScriptedRegistry)  # type: ignore[arg-type]
    with TestClient(app) as client:
        r = client.post("/v1/responses", json={"model": "m", "input": "hi"})
    assert r.status_code == 503  # not a server error: it was cancelled (an abort route)
    assert r.json()["error"]["code"] == "request_cancelled"


def test_response_error_events_name_the_kind():
    events = ResponseEvents({"status": "in_progress", "output": []}, nested_errors=True)
    [event] = events.fail(LmserveError(ErrorKind.INTERNAL, "boom"))
    assert event["error"]["type"] == event["error"]["code"] == "server_error"
    [event] = ResponseEvents({}).fail(LmserveError(ErrorKind.CAPACITY, FULL, code="kv_full"))
    assert event["code"] == "kv_full"


# ---- the card: /v1/models and /v1/embeddings ----------------------------------------------------

class CardBackend:
    """Only what /v1/models and /v1/embeddings read of a backend."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.name, self.aliases = card.name, card.aliases
        self.embedded: list[Sequence[int]] = []

    def require_ready(self) -> ModelCard:
        if not self.card.ready:
            raise LmserveError(ErrorKind.LOADING, "loading")
        return self.card

    def adapters(self, model: str | None, selection: Any = None) -> tuple[()]:
        return ()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    async def embed(self, inputs: Sequence[Sequence[int]], adapters: Any = ()
                    ) -> list[np.ndarray]:
        self.embedded.extend(inputs)
        return [np.arange(1, 5, dtype=np.float32) for _ in inputs]


class CardRegistry:
    def __init__(self, backend: CardBackend) -> None:
        self.backend = backend
        self.defaults: dict[str, Any] = {}

    def __iter__(self) -> Iterator[CardBackend]:
        return iter([self.backend])

    def names(self, backend: CardBackend) -> list[str]:
        return [backend.name, *backend.aliases]

    def get(self, name: str | None) -> CardBackend:
        if name not in (*self.backend.card.names,
                        *(f"{self.backend.name}:{s.alias}" for s in self.backend.card.loras)):
            raise LmserveError(ErrorKind.MODEL_NOT_FOUND, f"no model {name}", param="model")
        return self.backend


READY = ModelCard(
    name="tiny", aliases=("small",), kind="llama.cpp", source="/models/tiny.gguf",
    state=LoadState.READY, created=1700000000, n_ctx=2048, chat_template="{{ x }}",
    loras=(LoraSpec("half", "/loras/half.gguf", 0.5),), kv_layout="split",
    weights=WeightsFacts(architecture="llama", n_ctx_train=4096, n_params=1000,
                         n_embd=4, n_vocab=32000, size_bytes=2048))


def card_client(card: ModelCard) -> tuple[TestClient, CardBackend]:
    backend = CardBackend(card)
    app = FastAPI()
    app.include_router(routes.make_router(lambda: CardRegistry(backend)))  # type: ignore[arg-type]
    return TestClient(app), backend


def test_models_are_listed_from_the_card():
    client, _ = card_client(READY)
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert list(data) == ["tiny", "small", "tiny:half"]
    assert data["tiny"] == {
        "id": "tiny", "object": "model", "created": 1700000000, "owned_by": "lmserve",
        "status": "loaded", "meta": {
            "architecture": "llama", "n_ctx": 2048, "n_ctx_train": 4096, "n_params": 1000,
            "size": 2048, "n_vocab": 32000, "chat_template": True, "kv_layout": "split",
            "vision": False, "audio": False}}
    assert data["tiny:half"]["root"] == "/loras/half.gguf"
    assert data["tiny:half"]["parent"] == "tiny"
    assert data["tiny:half"]["lora"] == {"alias": "half", "scale": 0.5}
    assert client.get("/v1/models/small").json()["id"] == "small"


def test_a_loading_model_is_listed_without_meta():
    client, _ = card_client(ModelCard(name="tiny", aliases=(), kind="llama.cpp",
                                      source="/models/tiny.gguf", state=LoadState.LOADING))
    [entry] = client.get("/v1/models").json()["data"]
    assert entry["status"] == "loading" and "meta" not in entry


def test_embedding_dimensions_are_checked_against_the_card():
    client, backend = card_client(READY)
    r = client.post("/v1/embeddings", json={"model": "tiny", "input": "ab", "dimensions": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 2 and backend.embedded == [[97, 98]]
    r = client.post("/v1/embeddings", json={"model": "tiny", "input": "ab", "dimensions": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert "at most 4" in r.json()["error"]["message"]
