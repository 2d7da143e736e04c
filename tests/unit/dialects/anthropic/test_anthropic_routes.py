"""The Anthropic routes over a scripted service, and the dialect inside the real app."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.templates import ChatTemplate
from lmserve.chat.turn import turn_parser
from lmserve.core.backend import LoadState, ModelCard, PreparedPrompt
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.dialects.anthropic import encoder, routes
from lmserve.generation import ParsedGeneration
from lmserve.http.app import create_app
from lmserve.models.registry import ModelRegistry
from lmserve.prompting import continued
from lmserve.service import EngineSettings
from tests.unit.dialects.anthropic.test_anthropic import CHATML, STEPS, USER, golden_events, parse_sse

# -- routes over a scripted service -------------------------------------------------------------

class FakeGeneration:
    """Engine outputs, scripted (under a ParsedGeneration, as ModelService.start gives)."""

    def __init__(self, steps: list[list[TokenOutput]]) -> None:
        self.steps = steps
        self.closed = False

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        try:
            for step in self.steps:
                yield step
        finally:  # like the engine's Generation
            self.close()

    def close(self) -> None:
        self.closed = True


class FakeService:
    """Renders with a real ChatML template; one token per whitespace-separated word."""

    def __init__(self, steps: list[list[TokenOutput]], n_ctx: int = 4096) -> None:
        self.template = ChatTemplate(CHATML)
        self.steps, self.n_ctx, self.created = steps, n_ctx, 0
        self.started: list[tuple[Any, PreparedPrompt, FakeGeneration]] = []

    @property
    def card(self) -> ModelCard:
        return ModelCard(name="m", aliases=(), kind="llama.cpp", source="/m.gguf",
                         state=LoadState.READY, created=self.created, n_ctx=self.n_ctx,
                         chat_template=self.template.source)

    def require_ready(self) -> ModelCard:
        return self.card

    def render_chat(self, messages, *, add_generation_prompt=True, template_kwargs=None) -> str:
        return self.template.render([m.as_template_dict() for m in messages],
                                    add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def prepare(self, gen) -> PreparedPrompt:  # type: ignore[no-untyped-def]
        gen, prefill = continued(gen)  # a final assistant message continued, as Prompter does
        text = self.render_chat(gen.messages) + prefill
        return PreparedPrompt(self.tokenize(text), text)

    def start(self, gen, prepared, *,  # type: ignore[no-untyped-def]
              parse=None) -> ParsedGeneration:
        generation = FakeGeneration(self.steps)
        self.started.append((gen, prepared, generation))
        return ParsedGeneration(generation,  # type: ignore[arg-type]
                                lambda: turn_parser(None, None, prepared.text))


class FakeRegistry:
    def __init__(self, service: FakeService) -> None:
        self.service = service

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([self.service])

    def names(self, service: FakeService) -> list[str]:
        return ["m"]

    def get(self, name: str | None) -> FakeService:
        if name != "m":
            raise LmserveError(ErrorKind.MODEL_NOT_FOUND, f"no model {name}", param="model")
        return self.service


def fake_client(steps: list[list[TokenOutput]] = STEPS, **kw: Any
                ) -> tuple[TestClient, FakeService]:
    service = FakeService(steps, **kw)
    app = FastAPI()
    app.include_router(routes.make_router(lambda: FakeRegistry(service)))  # type: ignore[arg-type]
    return TestClient(app), service


REQUEST = {"model": "m", "max_tokens": 8, "messages": USER}


def test_create_message_body():
    client, service = fake_client()
    r = client.post("/v1/messages", json=REQUEST, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["id"].startswith("msg_")
    assert {k: v for k, v in data.items() if k != "id"} == {
        "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "usage": {"input_tokens": 6, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 4, "output_tokens": 3}}
    assert service.started[0][2].closed


def test_stream_over_http_is_the_golden_sequence():
    client, service = fake_client()
    r = client.post("/v1/messages", json={**REQUEST, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    n_prompt = len(service.started[0][1].tokens)
    expected = golden_events(events[0][1]["message"]["id"])
    expected[0][1]["message"]["usage"]["input_tokens"] = n_prompt
    assert events == expected
    assert service.started[0][2].closed


def test_an_error_after_the_stream_started_travels_inside_it():
    client, service = fake_client([[TokenOutput(0, "Hi")],
                                   [TokenOutput(0, finish_reason="error", error="decode failed")]])
    r = client.post("/v1/messages", json={**REQUEST, "stream": True})
    events = parse_sse(r.content)
    assert [e for e, _ in events][-2:] == ["content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {
        "type": "api_error", "message": "decode failed"}}
    assert service.started[0][2].closed
    r = client.post("/v1/messages", json=REQUEST)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"


async def test_closing_the_stream_closes_the_generation():
    generation = FakeGeneration(STEPS)
    parsed = ParsedGeneration(generation,  # type: ignore[arg-type]
                              lambda: turn_parser(None, None, None))
    stream = routes._stream(parsed, encoder.StreamEncoder("m", 3, context_capped=False))
    await stream.__anext__()
    await stream.aclose()  # what Starlette does when the client disconnects
    assert generation.closed


def test_max_tokens_beyond_the_context_runs_to_the_end_of_the_context():
    steps = [[TokenOutput(0, "x", finish_reason="length", usage=Usage(5, 2))]]
    client, service = fake_client(steps, n_ctx=12)
    r = client.post("/v1/messages", json={**REQUEST, "max_tokens": 64000})
    assert r.json()["stop_reason"] == "model_context_window_exceeded"
    gen, prepared, _ = service.started[0]
    assert gen.max_tokens == 12 - len(prepared.tokens)
    r = client.post("/v1/messages", json={**REQUEST, "max_tokens": 2})
    assert r.json()["stop_reason"] == "max_tokens"


def test_prefill_continues_after_the_assistant_header_and_count_tokens_agrees():
    client, service = fake_client()
    request = {**REQUEST, "messages": [*USER, {"role": "assistant", "content": "Sure, here"}]}
    client.post("/v1/messages", json=request)
    prepared = service.started[0][1]
    assert prepared.text is not None and prepared.text.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nSure, here")
    count = client.post("/v1/messages/count_tokens",
                        json={k: v for k, v in request.items() if k != "max_tokens"})
    assert count.json() == {"input_tokens": len(prepared.tokens)}


@pytest.mark.parametrize("fields, where", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"stop_sequences": [""]}, "stop_sequences[0]"),
    ({"metadata": {"user_id": "u", "other": 1}}, "metadata.other"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
])
def test_bad_requests_get_anthropic_400s(fields, where):
    client, _ = fake_client()
    request = {k: v for k, v in {**REQUEST, **fields}.items() if v is not None}
    r = client.post("/v1/messages", json=request)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert where in r.json()["error"]["message"]


def test_bad_json_unknown_model_and_count_tokens_errors():
    client, _ = fake_client()
    r = client.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/messages", json={**REQUEST, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/messages/count_tokens", json={"model": "m", "messages": USER,
                                                       "max_tokens": 5})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


# -- the real app: dialect choice at the root, auth, loading ------------------------------------

def real_app_client(**kw: Any) -> TestClient:
    registry = ModelRegistry()
    registry.add("tiny", "/nonexistent/tiny.gguf", EngineSettings(), aliases=["tiny.gguf"])
    return TestClient(create_app(registry, load_on_startup=False, **kw))


def test_root_models_answer_in_the_dialect_the_anthropic_version_header_picks():
    anthropic_headers = {"anthropic-version": "2023-06-01"}
    with real_app_client() as c:
        page = c.get("/v1/models", headers=anthropic_headers).json()
        assert [m["id"] for m in page["data"]] == ["tiny", "tiny.gguf"]
        assert page["has_more"] is False and page["first_id"] == "tiny"
        assert page["data"][0]["type"] == "model" and "display_name" in page["data"][0]
        assert c.get("/v1/models").json()["object"] == "list"
        assert c.get("/v1/models/tiny.gguf", headers=anthropic_headers).json()["type"] == "model"
        assert c.get("/v1/models/tiny.gguf").json()["object"] == "model"
        r = c.get("/v1/models/other", headers=anthropic_headers)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.get("/v1/models?limit=1", headers=anthropic_headers).json()
        assert r["has_more"] is True and r["last_id"] == "tiny"
        assert c.get("/v1/models?lifecycle[]=retired", headers=anthropic_headers).json()[
            "data"] == []


def test_auth_and_loading_in_anthropic_shape():
    with real_app_client(api_keys=("secret",)) as c:
        r = c.post("/v1/messages", json={**REQUEST, "model": "tiny"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/messages", json={**REQUEST, "model": "tiny"},
                   headers={"x-api-key": "secret", "anthropic-version": "2023-06-01"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        assert int(r.headers["retry-after"]) >= 1
        r = c.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 401 and r.json()["type"] == "error"
