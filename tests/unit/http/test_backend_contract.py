"""The backend contract (lmserve.core.backend): terminal events keep the engine's error kind,
ParsedGeneration parses per choice, the key middleware answers in the route's dialect, and
the dialect registry."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.turn import turn_parser
from lmserve.core.backend import (
    ChoiceStep,
    Failed,
    Finished,
    FinishReason,
    ModelBackend,
    choice_step,
)
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    TextDelta,
    TokenOutput,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.generation import ParsedGeneration
from lmserve.http import dialects
from lmserve.http.middleware import ApiKeyMiddleware
from lmserve.http.routing import dialect_route
from lmserve.service import EngineSettings, ModelService


def test_engine_failure_keeps_its_kind() -> None:
    out = TokenOutput(0, "", finish_reason="error", error="the model's KV cache is full",
                      error_kind=ErrorKind.CAPACITY, usage=Usage(5, 2))
    step = choice_step(out)
    assert isinstance(step.end, Failed)
    assert step.end.kind is ErrorKind.CAPACITY and step.finish_reason == "error"
    with pytest.raises(LmserveError) as caught:
        step.raise_failure()
    assert caught.value.kind.http_status == 503
    assert "KV cache" in caught.value.message


def test_engine_failure_without_kind_is_internal() -> None:
    step = choice_step(TokenOutput(0, "", finish_reason="error", error="boom"))
    assert isinstance(step.end, Failed) and step.end.kind is ErrorKind.INTERNAL


def test_finished_step_maps_reason_usage_and_stop() -> None:
    out = TokenOutput(1, "bye", token_ids=[7], finish_reason="stop", stop_match="###",
                      usage=Usage(3, 4, 1))
    step = choice_step(out)
    assert step.end == Finished(FinishReason.STOP, Usage(3, 4, 1), "###")
    assert step.events == [TextDelta(CHANNEL_OUTPUT, "bye")]
    assert (step.index, step.finish_reason, step.usage, step.stop_match) == \
        (1, "stop", Usage(3, 4, 1), "###")
    step.raise_failure()  # no failure: nothing raised


def test_running_step_has_no_terminal() -> None:
    step = choice_step(TokenOutput(0, "", token_ids=[1]))
    assert step.end is None and not step.finished and step.events == []


class _Request:
    request_id = "r1"
    n = 2


class _FakeGeneration:
    """The engine Generation's iteration and close, over scripted steps."""

    def __init__(self, steps: list[list[TokenOutput]]) -> None:
        self.steps, self.request, self.closed = steps, _Request(), False

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for step in self.steps:
            yield step

    def close(self) -> None:
        self.closed = True


async def _all(generation: ParsedGeneration) -> list[ChoiceStep]:
    return [step async for steps in generation for step in steps]


def test_parsed_generation_parses_each_choice_with_its_own_parser() -> None:
    steps = [[TokenOutput(0, "<think>hm</think>Hi"), TokenOutput(1, "<tool_call>{\"name\": ")],
             [TokenOutput(1, "\"f\", \"arguments\": {}}</tool_call>", finish_reason="stop",
                          usage=Usage(1, 2)),
              TokenOutput(0, " there", finish_reason="stop", usage=Usage(1, 2))]]
    generation = ParsedGeneration(_FakeGeneration(steps),  # type: ignore[arg-type]
                                  lambda: turn_parser("hermes", ("<think>", "</think>"), ""))
    out = asyncio.run(_all(generation))
    first = [e for s in out if s.index == 0 for e in s.events]
    assert TextDelta(CHANNEL_REASONING, "hm") in first
    assert "".join(e.text for e in first if isinstance(e, TextDelta)
                   and e.channel == CHANNEL_OUTPUT) == "Hi there"
    second = [e for s in out if s.index == 1 for e in s.events]
    assert any(isinstance(e, ToolCallStart) and e.name == "f" for e in second)
    assert any(isinstance(e, ToolCallEnd) and e.complete for e in second)
    assert generation.request_id == "r1" and generation.n == 2


def test_a_failed_choice_does_not_flush_its_held_text() -> None:
    steps = [[TokenOutput(0, "<tool_call>{\"na", finish_reason="error", error="x",
                          error_kind=ErrorKind.CAPACITY)]]
    generation = ParsedGeneration(_FakeGeneration(steps),  # type: ignore[arg-type]
                                  lambda: turn_parser("hermes", None, ""))
    (step,) = asyncio.run(_all(generation))
    assert isinstance(step.end, Failed) and step.end.kind is ErrorKind.CAPACITY
    assert not any(isinstance(e, (ToolCallStart, ToolCallEnd)) for e in step.events)
    assert "<tool" not in "".join(e.text for e in step.events if isinstance(e, TextDelta))


def test_model_service_satisfies_the_contract() -> None:
    service = ModelService("m", "/nonexistent.gguf", EngineSettings())
    assert isinstance(service, ModelBackend)
    card = service.card
    assert card.name == "m" and card.kind == "llama.cpp" and card.source == "/nonexistent.gguf"
    assert card.state == "pending" and not card.ready and card.weights is None
    assert "chat_template" not in card.settings and card.settings["parallel"] == 8
    assert service.stats() is None
    with pytest.raises(LmserveError) as caught:
        service.require_ready()
    assert caught.value.kind is ErrorKind.LOADING
    assert asyncio.run(service.abort("nobody")) is False


def _keyed_app(keys: tuple[str, ...]) -> TestClient:
    app = FastAPI()
    app.state.api_keys = keys
    app.add_middleware(ApiKeyMiddleware, keys=lambda: app.state.api_keys)
    shaped = APIRouter(route_class=dialect_route(lambda e: {"shaped": e.message}))
    public = APIRouter(route_class=dialect_route(lambda e: {"x": 1}, public=True))

    @shaped.post("/guarded")
    async def guarded() -> dict[str, bool]:
        return {"ok": True}

    @public.get("/page")
    async def page() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(shaped)
    app.include_router(public)
    return TestClient(app)


def test_key_middleware_answers_in_the_routes_dialect() -> None:
    client = _keyed_app(("sk-1", "sk-2"))
    refused = client.post("/guarded")
    assert refused.status_code == 401
    assert refused.json() == {"shaped": "invalid or missing API key"}
    assert client.post("/guarded", headers={"Authorization": "Bearer sk-2"}).json() == {"ok": True}
    assert client.post("/guarded", headers={"x-api-key": "sk-1"}).status_code == 200
    assert client.post("/guarded", headers={"x-api-key": "sk-3"}).status_code == 401
    assert client.get("/page").status_code == 200  # public dialect route
    assert client.get("/plain").status_code == 200  # not a dialect route (health, metrics)
    assert client.get("/missing").status_code == 404


def test_key_middleware_is_off_without_keys() -> None:
    assert _keyed_app(()).post("/guarded").json() == {"ok": True}


def test_dialect_registry() -> None:
    roots = [d.name for d in dialects.root_dialects()]
    assert roots[-1] == "openai" and {"anthropic", "ollama", "sglang", "ollm"} <= set(roots)
    assert list(dialects.resource_dialects()) == ["native", "openai", "anthropic", "ollama"]
    with pytest.raises(ValueError, match="unknown dialect"):
        dialects.get("klingon")
    extra = dialects.register(dialects.Dialect("echo", resource=lambda r, s, t: APIRouter(),
                                               prefix="echo"))
    try:
        assert dialects.get("echo") is extra and "echo" in dialects.resource_dialects()
    finally:
        dialects._DIALECTS.pop("echo")


def test_the_scripted_test_backend_satisfies_the_contract() -> None:
    from tests.unit.chat_service import ScriptedBackend, script
    backend = ScriptedBackend(script(["hi"]), "{{ messages[0].content }}")
    assert isinstance(backend, ModelBackend)
    assert backend.card.ready and backend.card.kind == "scripted"


class _Refused:
    """A generation its backend refuses once asked (as an upstream answers 4xx/5xx)."""

    def __init__(self, inner: ParsedGeneration) -> None:
        self.inner, self.closed = inner, False

    @property
    def request_id(self) -> str:
        return self.inner.request_id

    @property
    def finished(self) -> bool:
        return self.closed

    async def ready(self) -> None:
        raise LmserveError(ErrorKind.INVALID_REQUEST, "upstream: the prompt is too long",
                           param="messages", code="context_length_exceeded")

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self.inner.__aiter__()

    def close(self) -> None:
        self.closed = True
        self.inner.close()


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "ollama"])
def test_a_streamed_request_the_backend_refuses_is_a_status(dialect: str) -> None:
    from lmserve.dialects.anthropic.routes import make_router as anthropic_router
    from lmserve.dialects.ollama.routes import make_router as ollama_router
    from lmserve.dialects.openai.routes import make_router as openai_router
    from tests.unit.chat_service import ScriptedRegistry, ScriptedService, script

    class Refusing(ScriptedService):
        def start(self, request, prepared=None, *, parse=None):  # type: ignore[no-untyped-def]
            self.refused = _Refused(super().start(request, prepared, parse=parse))
            return self.refused

    service = Refusing(script(["never"]), "{% for m in messages %}{{ m.content }}{% endfor %}")
    router = {"openai": openai_router, "anthropic": anthropic_router,
              "ollama": ollama_router}[dialect]
    app = FastAPI()
    app.include_router(router(lambda: ScriptedRegistry(service)))
    messages = [{"role": "user", "content": "hi"}]
    path, body = {
        "openai": ("/v1/chat/completions", {"model": "m", "messages": messages, "stream": True}),
        "anthropic": ("/v1/messages", {"model": "m", "messages": messages, "max_tokens": 8,
                                       "stream": True}),
        "ollama": ("/api/chat", {"model": "m", "messages": messages, "stream": True}),
    }[dialect]
    reply = TestClient(app).post(path, json=body)
    assert reply.status_code == 400, reply.text
    assert "too long" in reply.text and reply.headers["content-type"].startswith(
        "application/json")
    assert service.refused.closed  # the refused generation is closed, nothing left running


def test_metrics_report_upstream_requests_errors_and_latency() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from lmserve.core.backend import EngineStats
    from lmserve.http.metrics import _upstream_families
    from lmserve.upstream.backend import _Counters

    counters = _Counters()
    counters.requests = 3
    counters.ttft(0.02)
    counters.ttft(0.4)
    counters.error(ErrorKind.UPSTREAM_TIMEOUT)
    counters.duration_sum, counters.duration_count = 1.5, 2

    class Upstream:
        name = "far"

        def stats(self) -> EngineStats:
            return EngineStats(counters=counters.tokens(), upstream=counters.traffic())

    class Local:  # a llama.cpp model reports no upstream families
        name = "near"

        def stats(self) -> EngineStats:
            return EngineStats(counters={"prompt_tokens": 5})

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            return _upstream_families([Upstream(), Local()])  # type: ignore[arg-type]

    prom = CollectorRegistry()
    prom.register(Collector())
    text = generate_latest(prom).decode()
    assert 'lmserve_upstream_requests_total{model="far"} 3.0' in text
    assert 'lmserve_upstream_errors_total{kind="upstream_timeout",model="far"} 1.0' in text
    assert 'lmserve_upstream_ttft_seconds_count{model="far"} 2.0' in text
    assert 'lmserve_upstream_ttft_seconds_bucket{le="+Inf",model="far"} 2.0' in text
    assert 'lmserve_upstream_request_seconds_sum{model="far"} 1.5' in text
    assert 'model="near"' not in text
