"""The context overflow policy in every chat dialect: each one's field maps to it, a refusal
comes in the dialect's own error shape, and a truncated prompt is reported in a header (a real
ModelService over a scripted generation; the stub tokenizer counts characters)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.cli import build_parser, serve_config
from lmserve.config import build, from_env
from lmserve.core.errors import LmserveError
from lmserve.core.request import with_defaults
from lmserve.dialects.anthropic import routes as anthropic_routes
from lmserve.dialects.native import adapter as native_adapter
from lmserve.dialects.native.schema import GenerateBody
from lmserve.dialects.ollama import adapter as ollama_adapter
from lmserve.dialects.ollama import routes as ollama_routes
from lmserve.dialects.ollama.schema import ChatRequest, GenerateRequest
from lmserve.dialects.ollm.adapter import generation_request as ollm_request
from lmserve.dialects.ollm.schema import GenerationIn
from lmserve.dialects.openai import routes as openai_routes
from lmserve.http.streaming import TRUNCATED_HEADER
from lmserve.models.resource import check_params
from tests.unit.chat_service import ScriptedRegistry, ScriptedService, scripted_client

N_CTX = 400
HISTORY = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y" * 100},
           {"role": "user", "content": "Hi?"}]
OPENAI_CHAT = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, *HISTORY]}


def client_for(make_router: Any) -> tuple[TestClient, ScriptedService]:
    client, service = scripted_client(make_router, ["ok"], CHATML_TEMPLATE)
    service.n_ctx = N_CTX
    return client, service


def prompt_of(service: ScriptedService) -> str:
    return service.started[-1][1].text or ""


# ---- OpenAI chat completions ----------------------------------------------------------------

def test_openai_refuses_by_default_and_truncates_on_request() -> None:
    client, service = client_for(openai_routes.make_router)
    r = client.post("/v1/chat/completions", json=OPENAI_CHAT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions", json={**OPENAI_CHAT, "context_overflow": "truncate"})
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"
    assert "Be brief." in prompt_of(service) and "x" * 10 not in prompt_of(service)
    assert r.json()["choices"][0]["message"]["content"] == "ok"


def test_openai_stream_carries_the_header_and_fitting_requests_have_none() -> None:
    client, _ = client_for(openai_routes.make_router)
    r = client.post("/v1/chat/completions",
                    json={**OPENAI_CHAT, "context_overflow": "truncate", "stream": True})
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"
    short = {"model": "m", "messages": [{"role": "user", "content": "Hi?"}],
             "context_overflow": "truncate"}
    assert TRUNCATED_HEADER not in client.post("/v1/chat/completions", json=short).headers


def test_openai_bad_value_and_raw_completions_are_refused() -> None:
    client, _ = client_for(openai_routes.make_router)
    r = client.post("/v1/chat/completions", json={**OPENAI_CHAT, "context_overflow": "drop"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "context_overflow"
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi",
                                             "context_overflow": "truncate"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "context_overflow"
    assert error["code"] == "unsupported_parameter"


def test_a_max_tokens_truncation_cannot_meet_says_so() -> None:
    client, _ = client_for(openai_routes.make_router)
    r = client.post("/v1/chat/completions",
                    json={**OPENAI_CHAT, "context_overflow": "truncate", "max_tokens": 390})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# ---- Anthropic ------------------------------------------------------------------------------

ANTHROPIC = {"model": "m", "system": "Be brief.", "max_tokens": 4096, "messages": HISTORY}


def test_anthropic_truncates_with_max_tokens_as_a_cap() -> None:
    client, service = client_for(anthropic_routes.make_router)
    r = client.post("/v1/messages", json=ANTHROPIC)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/messages", json={**ANTHROPIC, "context_overflow": "truncate"})
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"
    assert "x" * 10 not in prompt_of(service) and "Be brief." in prompt_of(service)
    r = client.post("/v1/messages", json={**ANTHROPIC, "context_overflow": "truncate",
                                          "stream": True})
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"


# ---- Ollama ---------------------------------------------------------------------------------

OLLAMA = {"model": "m", "stream": False,
          "messages": [{"role": "system", "content": "Be brief."}, *HISTORY]}


def test_ollama_truncate_field() -> None:
    client, service = client_for(ollama_routes.make_router)
    r = client.post("/api/chat", json=OLLAMA)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = client.post("/api/chat", json={**OLLAMA, "truncate": True})
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"
    assert r.json()["message"]["content"] == "ok"
    assert client.post("/api/chat", json={**OLLAMA, "truncate": False}).status_code == 400


def test_ollama_truncates_to_the_num_ctx_window() -> None:
    client, service = client_for(ollama_routes.make_router)
    service.n_ctx = 4096
    body = {**OLLAMA, "truncate": True, "options": {"num_ctx": N_CTX}}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"
    assert len(service.started[-1][1].tokens) < N_CTX


def test_ollama_mapping_and_raw_generate() -> None:
    assert ollama_adapter.overflow_policy(None) is None
    assert ollama_adapter.overflow_policy(True) == "truncate"
    assert ollama_adapter.overflow_policy(False) == "error"
    job = ollama_adapter.chat_job(ChatRequest(model="m", messages=[], truncate=True))
    assert job.request.context_overflow == "truncate"
    with pytest.raises(LmserveError) as caught:
        ollama_adapter.generate_job(GenerateRequest(model="m", prompt="p", raw=True,
                                                    truncate=True))
    assert caught.value.param == "truncate"


# ---- native, oLLM, resource defaults, server default ---------------------------------------

class TruncatingResource(ScriptedRegistry):
    """A resource's view whose default params ask for truncation."""

    def __init__(self, service: ScriptedService) -> None:
        super().__init__(service)
        self.defaults = {"context_overflow": "truncate"}


@pytest.mark.parametrize("make_router, path, body", [
    (openai_routes.make_router, "/v1/chat/completions", OPENAI_CHAT),
    (anthropic_routes.make_router, "/v1/messages", ANTHROPIC),
    (ollama_routes.make_router, "/api/chat", OLLAMA),
])
def test_a_resource_default_applies_and_a_request_overrides_it(make_router: Any, path: str,
                                                               body: dict[str, Any]) -> None:
    _, service = client_for(make_router)
    app = FastAPI()
    app.include_router(make_router(lambda: TruncatingResource(service)))
    client = TestClient(app)
    r = client.post(path, json=body)
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "2"
    refuse = {"truncate": False} if path == "/api/chat" else {"context_overflow": "error"}
    assert client.post(path, json={**body, **refuse}).status_code == 400


def native(transport: str, **params: Any) -> Any:
    body = GenerateBody(transport=transport, prompt="p", params=params)  # type: ignore[arg-type]
    request = native_adapter.generation_request(
        body, default_transport="chat", has_template=True, reasoning_default=False).request
    return with_defaults(request, {"context_overflow": "truncate"})


def test_native_params() -> None:
    assert native("chat").context_overflow == "truncate"  # the resource default
    assert native("chat", context_overflow="error").context_overflow == "error"
    assert native("raw").context_overflow is None  # a default does not touch raw prompts
    with pytest.raises(LmserveError) as caught:
        native("raw", context_overflow="truncate")
    assert caught.value.param == "params.context_overflow"
    assert check_params({"context_overflow": "truncate"}) == {"context_overflow": "truncate"}
    with pytest.raises(LmserveError):
        check_params({"context_overflow": "drop"})


def test_ollm_generation_setting() -> None:
    request = ollm_request([], GenerationIn(context_overflow="truncate"), "m")
    assert request.context_overflow == "truncate"
    assert ollm_request([], GenerationIn(), "m").context_overflow is None


def test_server_default_from_flag_file_and_env(tmp_path: Any) -> None:
    args = build_parser().parse_args(["serve", "--context-overflow", "truncate"])
    assert serve_config(args).engine.context_overflow == "truncate"
    assert build({}).engine.context_overflow == "error"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"context_overflow": "truncate"}}))
    args = build_parser().parse_args(["serve", "--config", str(config)])
    assert serve_config(args).engine.context_overflow == "truncate"
    assert build(from_env({"LMSERVE_CONTEXT_OVERFLOW": "truncate"})).engine.context_overflow \
        == "truncate"
    with pytest.raises(ValueError, match="context_overflow"):
        build({"context_overflow": "drop"})
