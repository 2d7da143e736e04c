"""The Ollama dialect over the backend contract: a choice that fails keeps its ErrorKind, so a
full KV cache (CAPACITY) is a 503 before the first byte and the stream's last line after it;
the catalogue (/api/tags, /api/ps, /api/show) and the load wait read only the model's card."""

from __future__ import annotations

import json
import pathlib
import threading
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.core.backend import LoadState, ModelCard, WeightsFacts
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput
from lmserve.dialects.ollama import routes
from tests.unit.chat_service import ScriptedRegistry, ScriptedService
from tests.unit.dialects.anthropic.test_anthropic_contract import FULL, engine_imports, failing
from tests.unit.dialects.anthropic.test_anthropic_contract import client_for as scripted_client_for

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi?"}]}
RAW = {"model": "m", "prompt": "Hi?", "raw": True}


def client_for(steps: list[list[TokenOutput]]) -> tuple[TestClient, ScriptedService]:
    return scripted_client_for(steps, routes.make_router)


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines()]


@pytest.mark.parametrize("path, body", [("/api/chat", CHAT), ("/api/generate", RAW)])
@pytest.mark.parametrize("kind, status", [(ErrorKind.CAPACITY, 503), (ErrorKind.UPSTREAM, 502),
                                          (ErrorKind.UPSTREAM_TIMEOUT, 504),
                                          (ErrorKind.INTERNAL, 500)])
def test_a_failed_choice_before_the_first_byte_has_its_kinds_status(path, body, kind, status):
    client, service = client_for(failing(kind, "it went wrong"))
    r = client.post(path, json={**body, "stream": False})
    assert r.status_code == status and r.json() == {"error": "it went wrong"}
    assert service.started[0][2].closed


@pytest.mark.parametrize("path, body, text", [
    ("/api/chat", CHAT, lambda f: f["message"]["content"]),
    ("/api/generate", RAW, lambda f: f["response"]),
])
def test_a_full_kv_cache_after_the_first_byte_is_the_streams_last_line(path, body, text):
    client, service = client_for(failing(ErrorKind.CAPACITY))
    r = client.post(path, json=body)
    assert r.status_code == 200
    frames = lines(r.content)
    assert frames[-1] == {"error": FULL}
    assert not any(f.get("done") for f in frames)
    shown = "".join(text(f) for f in frames[:-1])
    assert " there" not in shown  # the failing step's text is dropped with it
    if path == "/api/chat":  # parsed: the reasoning is thinking, the rest the answer
        assert shown == "Hello"
        assert "".join(f["message"].get("thinking", "") for f in frames[:-1]) == "Hmm."
    else:  # a raw prompt's output is the client's own text: not parsed
        assert shown == "Hmm.</think>Hello"
    assert service.started[0][2].closed


# -- the card: catalogue and load wait over a backend that is not a ModelService -------------

class CardOnlyBackend:
    """All the catalogue routes may use of a model: its card (an upstream-like one here: a URL,
    weights facts as reported, no GGUF metadata)."""

    name, aliases = "up", ()

    def __init__(self, state: LoadState = LoadState.READY) -> None:
        self.state = state

    @property
    def card(self) -> ModelCard:
        return ModelCard(name="up", aliases=(), kind="upstream", source="http://upstream:8000/v1",
                         state=self.state, created=1_700_000_000, n_ctx=2048,
                         chat_template="{{ messages }}",
                         weights=WeightsFacts(architecture="qwen2", n_params=7_000_000_000,
                                              n_embd=16, size_bytes=5_000))

    def require_ready(self) -> ModelCard:
        card = self.card
        if card.state is not LoadState.READY:
            raise LmserveError(ErrorKind.LOADING, "model 'up' is loading", retry_after=2)
        return card


def card_client(backend: CardOnlyBackend) -> TestClient:
    app = FastAPI()
    app.include_router(routes.make_router(lambda: ScriptedRegistry(backend)))  # type: ignore
    return TestClient(app)


def test_catalogue_from_the_card_alone():
    client = card_client(CardOnlyBackend())
    tag = client.get("/api/tags").json()["models"][0]
    assert tag["name"] == "up" and tag["size"] == 5_000 and len(tag["digest"]) == 64
    assert tag["modified_at"].startswith("2023-11-14T")  # no file: the card's creation time
    assert tag["details"]["family"] == "qwen2" and tag["details"]["parameter_size"] == "7B"
    ps = client.get("/api/ps").json()["models"][0]
    assert ps["size"] == 5_000 and ps["context_length"] == 2048  # no metadata: no KV estimate
    show = client.post("/api/show", json={"model": "up"}).json()
    assert show["template"] == "{{ messages }}" and show["license"] == ""
    assert "FROM http://upstream:8000/v1" in show["modelfile"]
    assert "num_ctx                        2048" in show["parameters"]
    assert show["model_info"] == {"general.parameter_count": 7_000_000_000}


def test_the_catalogue_leaves_out_models_still_loading():
    client = card_client(CardOnlyBackend(LoadState.LOADING))
    assert client.get("/api/ps").json() == {"models": []}
    assert client.get("/api/tags").json()["models"][0]["details"]["parameter_size"] == "7B"
    r = client.post("/api/show", json={"model": "up"})
    assert r.status_code == 503 and "loading" in r.json()["error"]


def test_an_empty_chat_waits_on_the_cards_state():
    backend = CardOnlyBackend(LoadState.LOADING)
    client = card_client(backend)
    timer = threading.Timer(0.3, lambda: setattr(backend, "state", LoadState.READY))
    timer.start()
    try:
        r = client.post("/api/chat", json={"model": "up", "messages": []})
    finally:
        timer.cancel()
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    backend.state = LoadState.FAILED
    r = client.post("/api/generate", json={"model": "up", "prompt": ""})
    assert r.status_code == 503  # the backend's refusal, as it gives it


def test_the_dialect_imports_only_the_contract():
    assert engine_imports(pathlib.Path(routes.__file__).parent) == []
