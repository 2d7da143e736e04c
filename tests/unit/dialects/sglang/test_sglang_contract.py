"""The SGLang dialect over the backend contract: a choice that fails keeps its ErrorKind, so a
full KV cache (CAPACITY) is a 503 before the first byte and an in-stream error body with code
503 after it; model and server info come from the card and the engine's stats; the dialect
imports nothing of the engine or the service."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.core.backend import EngineStats, ModelCard, WeightsFacts
from lmserve.core.errors import ErrorKind
from lmserve.core.events import TokenOutput, Usage
from lmserve.dialects.sglang import routes
from tests.unit.chat_service import ScriptedRegistry, ScriptedService, imports, script

FULL = "the model's KV cache is full; retry shortly"
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
# The kinds a failed choice may carry that map to their own status (also used by the native
# and oLLM contract tests).
FAILURE_STATUS = [(ErrorKind.CAPACITY, 503), (ErrorKind.UPSTREAM, 502),
                  (ErrorKind.UPSTREAM_TIMEOUT, 504), (ErrorKind.INTERNAL, 500)]


def failing(kind: ErrorKind, message: str = FULL) -> list[list[TokenOutput]]:
    """Two chunks of answer, then the choice fails."""
    return [[TokenOutput(0, "Hel", token_ids=[1])], [TokenOutput(0, "lo", token_ids=[2])],
            [TokenOutput(0, "", finish_reason="error", error=message, error_kind=kind,
                         usage=Usage(2, 2))]]


class Scripted(ScriptedService):
    """The scripted backend, with the loaded weights' facts on its card."""

    @property
    def card(self) -> ModelCard:
        return dataclasses.replace(super().card, weights=WeightsFacts(
            architecture="llama", n_ctx_train=8192, n_params=1234, size_bytes=99))


def scripted(steps: list[list[TokenOutput]], template: str = TEMPLATE) -> Scripted:
    return Scripted(steps, template)


def client_for(service: ScriptedService) -> TestClient:
    app = FastAPI()
    app.include_router(routes.make_router(lambda: ScriptedRegistry(service)))  # type: ignore
    app.state.lmserve = SimpleNamespace(store=None, store_settings=SimpleNamespace(
        url="memory", data_dir=None))
    return TestClient(app)


def frames(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("kind, status", FAILURE_STATUS)
def test_a_failed_choice_before_the_first_byte_has_its_kinds_status(kind, status):
    service = scripted(failing(kind, "it went wrong"))
    r = client_for(service).post("/generate", json={"model": "m", "text": "hi"})
    assert r.status_code == status
    assert r.json() == {"error": {"message": "it went wrong",
                                  "type": HTTPStatus(status).phrase,  # "Service Unavailable"
                                  "param": None, "code": status}}
    assert service.started[0][2].closed


def test_a_full_kv_cache_after_the_first_byte_is_an_error_body_in_the_stream():
    service = scripted(failing(ErrorKind.CAPACITY))
    r = client_for(service).post("/generate", json={"model": "m", "text": "hi", "stream": True})
    assert r.status_code == 200
    got = frames(r.text)
    assert [f["text"] for f in got[:2]] == ["Hel", "Hello"]
    assert got[2] == {"error": {"message": FULL, "type": "Service Unavailable", "param": None,
                                "code": 503}}
    assert got[3:] == ["[DONE]"]
    assert service.started[0][2].closed


def test_generate_reads_the_raw_text_unparsed():
    service = scripted(script(["<think>a</think>", "b"], finish="length"))
    body = client_for(service).post("/generate", json={"model": "m", "text": "hi"}).json()
    assert body["text"] == "<think>a</think>b"
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


def test_health_generate_fails_with_the_failures_message():
    service = scripted([[TokenOutput(0, "", finish_reason="error", error=FULL,
                                     error_kind=ErrorKind.CAPACITY)]])
    r = client_for(service).get("/health_generate")
    assert r.status_code == 503 and FULL in r.json()["error"]["message"]
    request = service.started[0][0]
    assert request.prompt_tokens == [ord(c) for c in "ping"] and request.max_tokens == 1
    assert client_for(scripted(script(["x"]))).get("/health_generate").status_code == 200


def test_model_and_server_info_come_from_the_card_and_stats():
    service = scripted(script(["x"]))
    c = client_for(service)
    info = c.get("/model_info?model=m").json()
    assert (info["model_type"], info["context_length"], info["state"]) == ("llama", 4096, "ready")
    assert (info["n_params"], info["context_length_train"], info["size_bytes"]) == \
        (1234, 8192, 99)
    assert "quantization" not in info  # the file's header is unreadable here
    assert info["model_path"] == "/nonexistent.gguf" and info["is_generation"]
    server = c.get("/server_info").json()
    model = server["models"][0]
    assert (model["max_running_requests"], model["context_length"]) == (4, 4096)
    assert model["engine"] == dict(service.card.settings)  # the template's source is not on it
    service.stats = lambda: None  # type: ignore[method-assign]  # no engine running yet
    state = c.get("/server_info").json()["internal_states"][0]
    assert state == {"model": "m", "state": "ready", "error": None}
    service.stats = lambda: EngineStats(active_requests=2, prefix_cache_hits=3,  # type: ignore
                                        prefix_cache_tokens=40)
    state = c.get("/server_info").json()["internal_states"][0]
    assert state == {"model": "m", "state": "ready", "error": None, "active_requests": 2,
                     "engine_alive": True, "prefix_cache_hits": 3,
                     "prefix_cache_reused_tokens": 40}


def test_abort_request_asks_the_backend():
    service = scripted(script(["x"]))
    assert client_for(service).post("/abort_request", json={"rid": "r1"}).status_code == 200
    assert service.aborted == ["r1"]  # unknown to the backend: still a 200, as in SGLang


def test_the_dialect_imports_only_the_contract():
    """Routes encode: no engine, no ModelService. The GGUF header is read only for what the
    card does not carry (quantization, pooling-only models)."""
    for file, module in imports(pathlib.Path(routes.__file__).parent):
        assert not module.startswith(("lmserve.engine", "lmserve.service")), (file, module)
        if module.startswith("lmserve.models.gguf_header"):
            assert file == "routes.py"
