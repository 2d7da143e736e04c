"""A model's default generation parameters, applied in one place to the neutral request
(core.request.with_defaults): they fill only the fields the caller left unset (each dialect's
adapter says which it set, through its own names), the card's under a resource view's under
the caller's, and a default that makes no sense is refused in the caller's dialect."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from lmserve.core.backend import ModelCard
from lmserve.core.errors import LmserveError
from lmserve.core.request import (
    DEFAULTABLE,
    ChatMessage,
    FieldNames,
    GenerationRequest,
    SamplingParams,
    explicit_fields,
    with_defaults,
)
from lmserve.dialects.anthropic import adapter as anthropic_adapter
from lmserve.dialects.anthropic import routes as anthropic_routes
from lmserve.dialects.anthropic.schema import MessageRequest
from lmserve.dialects.native import routes as native_routes
from lmserve.dialects.native.producer import StreamProducers
from lmserve.dialects.ollama import adapter as ollama_adapter
from lmserve.dialects.ollama import routes as ollama_routes
from lmserve.dialects.ollama.schema import ChatRequest, GenerateRequest
from lmserve.dialects.ollm.adapter import generation_request as ollm_request
from lmserve.dialects.ollm.schema import GenerationIn
from lmserve.dialects.openai import adapter as openai_adapter
from lmserve.dialects.openai import routes as openai_routes
from lmserve.dialects.openai.responses import adapter as responses_adapter
from lmserve.dialects.openai.responses.schema import ResponseCreate
from lmserve.dialects.openai.schema import ChatCompletionRequest
from lmserve.dialects.sglang import adapter as sglang_adapter
from lmserve.dialects.sglang import routes as sglang_routes
from lmserve.dialects.sglang.schema import GenerateRequest as SglangRequest
from lmserve.http.app import StoreSettings, create_app
from lmserve.http.routing import defaults_of
from lmserve.models.registry import ModelRegistry
from lmserve.models.resource import PARAM_TYPES, LLMResource, check_params
from lmserve.stores import StreamRetention
from lmserve.stores.memory import MemoryStreams
from lmserve.upstream import UpstreamBackend, UpstreamSettings
from tests.unit.chat_service import ScriptedRegistry, ScriptedService, script
from tests.unit.upstream.test_upstream_dialects import FakeUpstream

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
MSG = [{"role": "user", "content": "hi"}]
CHAT = [ChatMessage("user", "hi")]


# -- the one function ------------------------------------------------------------------------

def test_only_unset_fields_are_filled() -> None:
    request = GenerationRequest(messages=CHAT, sampling=SamplingParams(temperature=0.3),
                                max_tokens=40, explicit=frozenset({"temperature", "max_tokens"}))
    filled = with_defaults(request, {"temperature": 0.9, "max_tokens": 5, "top_k": 7,
                                     "seed": 3, "stop": "END", "repetition_penalty": 1.2})
    assert (filled.sampling.temperature, filled.max_tokens) == (0.3, 40)  # the caller's
    assert (filled.sampling.top_k, filled.sampling.seed, filled.stop) == (7, 3, ["END"])
    assert filled.sampling.repetition_penalty == 1.2
    assert filled.explicit == request.explicit  # still the caller's own
    assert with_defaults(request, {}) is request
    # Only neutral generation parameters fill anything; a null default is no default.
    assert with_defaults(request, {"lora": "x", "n": 4, "top_k": None}) is request


def test_a_raw_prompt_takes_no_chat_only_default() -> None:
    defaults = {"context_overflow": "truncate", "reasoning": True, "top_p": 0.5}
    chat = with_defaults(GenerationRequest(messages=CHAT), defaults)
    assert (chat.context_overflow, chat.reasoning, chat.sampling.top_p) == ("truncate", True, 0.5)
    raw = with_defaults(GenerationRequest(prompt="x"), defaults)
    assert (raw.context_overflow, raw.reasoning, raw.sampling.top_p) == (None, None, 0.5)


def test_precedence_card_then_view_then_caller() -> None:
    card = SimpleNamespace(defaults={"temperature": 0.1, "top_k": 3, "max_tokens": 7})
    view = SimpleNamespace(defaults={"temperature": 0.5, "max_tokens": 6})
    defaults = defaults_of(view, SimpleNamespace(card=card))
    assert defaults == {"temperature": 0.5, "top_k": 3, "max_tokens": 6}
    assert defaults_of(SimpleNamespace(), SimpleNamespace(card=card)) == card.defaults  # root
    caller = GenerationRequest(messages=CHAT, max_tokens=2, explicit=frozenset({"max_tokens"}))
    filled = with_defaults(caller, defaults)
    assert (filled.sampling.temperature, filled.sampling.top_k, filled.max_tokens) == (0.5, 3, 2)


@pytest.mark.parametrize(("defaults", "param"), [
    ({"top_p": 0}, "options.top_p"),
    ({"repetition_penalty": 50.0}, "options.repeat_penalty"),
    ({"seed": 2**70}, "options.seed"),
    ({"temperature": "hot"}, "options.temperature"),
    ({"top_k": 2.5}, "options.top_k"),
    ({"max_tokens": 0}, "options.num_predict"),
    ({"stop": [1, 2]}, "options.stop"),
    ({"context_overflow": "drop"}, "options.context_overflow"),
])
def test_a_default_that_makes_no_sense_is_refused_by_the_dialects_name(defaults, param) -> None:
    request = GenerationRequest(messages=CHAT, fields=ollama_adapter.FIELDS)
    with pytest.raises(LmserveError) as caught:
        with_defaults(request, defaults)
    assert caught.value.param == param and caught.value.kind.http_status == 400
    assert "the model's default" in caught.value.message


def test_the_filled_request_is_checked_again() -> None:
    # Sampling is checked when the request is made and again once it is filled: a request
    # that dodged the check (an adapter that mutates it) cannot slip through with defaults.
    request = GenerationRequest(messages=CHAT, fields=FieldNames("params."))
    object.__setattr__(request.sampling, "top_p", 7.0)
    with pytest.raises(LmserveError) as caught:
        with_defaults(request, {"temperature": 0.2})
    assert caught.value.param == "params.top_p"


def test_explicit_fields_go_through_the_dialects_names() -> None:
    given = {"num_predict": -1, "repeat_penalty": 1.1, "temperature": None, "num_ctx": 99,
             "stop": ["x"]}
    assert explicit_fields(given, {"num_predict": "max_tokens",
                                   "repeat_penalty": "repetition_penalty"}) == \
        {"max_tokens", "repetition_penalty", "stop"}  # a null is unset; num_ctx fills nothing


def test_the_defaults_vocabulary_is_the_one_resources_accept() -> None:
    assert set(PARAM_TYPES) == DEFAULTABLE
    assert check_params({"top_k": 5, "stop": "x"}) == {"top_k": 5, "stop": "x"}
    for bad, param in (({"top_p": 0}, "params.top_p"), ({"max_tokens": 0}, "params.max_tokens"),
                       ({"repetition_penalty": 50}, "params.repetition_penalty")):
        with pytest.raises(LmserveError) as caught:
            check_params(bad)  # refused when set (PUT, a config section), not at each request
        assert caught.value.param == param


# -- each dialect's adapter says what its caller set --------------------------------------------

def test_adapters_name_what_the_wire_body_set() -> None:
    chat = openai_adapter.chat_request(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "max_completion_tokens": 4, "top_p": None,
         "reasoning_effort": "low", "context_overflow": "error", "unknown_field": 1}))
    assert chat.explicit == {"max_tokens", "reasoning", "context_overflow"}
    message, _ = anthropic_adapter.message_request(MessageRequest.model_validate(
        {"model": "m", "messages": MSG, "max_tokens": 9, "stop_sequences": ["x"]}))
    # max_tokens is required and thinking absent is off, so no default replaces either
    assert message.explicit == {"max_tokens", "stop", "reasoning"}
    response = responses_adapter.generation_request(ResponseCreate.model_validate(
        {"model": "m", "input": "hi", "max_output_tokens": 5, "truncation": "auto",
         "reasoning": {"summary": "auto"}}), CHAT)
    assert response.explicit == {"max_tokens", "context_overflow"}  # a summary is no effort
    job = ollama_adapter.chat_job(ChatRequest.model_validate(
        {"model": "m", "messages": MSG, "think": False, "truncate": True,
         "options": {"num_predict": -1, "repeat_penalty": 1.0, "num_ctx": 64}}))
    assert job.request.explicit == {"max_tokens", "repetition_penalty", "reasoning",
                                    "context_overflow"}
    assert job.request.max_tokens is None  # -1: until the window is full, not a default
    generate = ollama_adapter.generate_job(GenerateRequest.model_validate(
        {"model": "m", "prompt": "hi", "options": {"seed": -1, "stop": ["x"]}}))
    assert generate.request.explicit == {"seed", "stop"}  # -1 asks for a random seed
    plan = sglang_adapter.generate_plan(SglangRequest.model_validate(
        {"text": "hi", "sampling_params": {"max_new_tokens": 3, "sampling_seed": 1}}),
        new_rid=lambda: "r")
    assert plan.jobs[0].request.explicit == {"max_tokens", "seed"}
    ollm = ollm_request(CHAT, GenerationIn(max_new_tokens=3, top_k=2), "m")
    assert ollm.explicit == {"max_tokens", "top_k"}


# -- through every dialect's route --------------------------------------------------------------

CARD = {"temperature": 0.1, "top_k": 3, "max_tokens": 7, "min_p": 0.05, "stop": "END",
        "context_overflow": "truncate"}
VIEW = {"temperature": 0.5, "max_tokens": 6}


class Defaulted(ScriptedService):
    """A model whose card carries its own defaults (a config section, Ollama's params)."""

    card_defaults: dict[str, Any] = CARD

    @property
    def card(self) -> ModelCard:
        return dataclasses.replace(super().card, defaults=self.card_defaults)


class View(ScriptedRegistry):
    view_defaults: dict[str, Any] = VIEW

    def __init__(self, service: ScriptedService) -> None:
        super().__init__(service)
        self.defaults = dict(self.view_defaults)


def client(make_router: Any, service: ScriptedService, view: type[View] = View) -> TestClient:
    app = FastAPI()
    router: APIRouter = make_router(lambda: view(service))
    app.include_router(router)
    app.state.lmserve = SimpleNamespace(store=None, store_settings=SimpleNamespace(
        url="memory", data_dir=None))
    return TestClient(app)


# (router, path, body without sampling fields, where the body carries them)
ROUTES: list[tuple[Any, str, dict[str, Any], str | None]] = [
    (openai_routes.make_router, "/v1/chat/completions", {"model": "m", "messages": MSG}, None),
    (openai_routes.make_router, "/v1/completions", {"model": "m", "prompt": "hi"}, None),
    (anthropic_routes.make_router, "/v1/messages",
     {"model": "m", "messages": MSG, "max_tokens": 9}, None),
    (ollama_routes.make_router, "/api/chat", {"model": "m", "messages": MSG, "stream": False},
     "options"),
    (ollama_routes.make_router, "/api/generate",
     {"model": "m", "prompt": "hi", "raw": True, "stream": False}, "options"),
    (sglang_routes.make_router, "/generate", {"model": "m", "text": "hi"}, "sampling_params"),
]


def with_fields(body: dict[str, Any], where: str | None, **fields: Any) -> dict[str, Any]:
    return {**body, **({where: fields} if where else fields)}


@pytest.mark.parametrize(("make_router", "path", "body", "where"), ROUTES)
def test_every_dialect_fills_what_its_caller_left_unset(make_router, path, body, where) -> None:
    service = Defaulted(script(["ok"]), TEMPLATE)
    http = client(make_router, service)
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    gen = service.started[-1][0]
    chat = gen.messages is not None
    s = gen.sampling
    assert (s.temperature, s.top_k, s.min_p, gen.stop) == (0.5, 3, 0.05, ["END"])  # view, card
    # Anthropic's max_tokens is required, so the caller's always stands.
    assert gen.max_tokens == (9 if path == "/v1/messages" else 6)
    assert gen.context_overflow == ("truncate" if chat else None)  # a raw prompt is not cut
    r = http.post(path, json=with_fields(body, where, temperature=0.2, top_k=9))
    assert r.status_code == 200, r.text
    s = service.started[-1][0].sampling
    assert (s.temperature, s.top_k, s.min_p) == (0.2, 9, 0.05)  # the caller's, then defaults


class BadView(View):
    view_defaults = {"top_p": 0}


@pytest.mark.parametrize(("make_router", "path", "body", "where"), ROUTES)
def test_a_default_out_of_bounds_is_a_400_in_the_dialect(make_router, path, body,
                                                         where) -> None:
    service = Defaulted(script(["ok"]), TEMPLATE)
    http = client(make_router, service, BadView)
    r = http.post(path, json=body)
    assert r.status_code == 400 and "the model's default" in r.text, r.text
    assert not service.started
    # The caller's own value overrides the bad default.
    assert http.post(path, json=with_fields(body, where, top_p=0.9)).status_code == 200


@pytest.fixture()
def native() -> Iterator[tuple[TestClient, LLMResource, Defaulted]]:
    service = Defaulted(script(["ok"]), TEMPLATE)
    resource = LLMResource.for_service(service, "/m/")
    store = MemoryStreams(StreamRetention(), time.time)
    app = FastAPI()
    app.include_router(native_routes.make_router(resource, StreamProducers(lambda: store)),
                       prefix="/m")
    with TestClient(app) as c:
        yield c, resource, service


def test_native_takes_the_card_under_the_resource(native) -> None:
    http, resource, service = native
    resource.set_defaults({"temperature": 0.5, "max_tokens": 6})
    assert http.post("/m/query/", json={"prompt": "hi"}).status_code == 200
    gen = service.started[-1][0]
    assert (gen.sampling.temperature, gen.sampling.top_k, gen.max_tokens) == (0.5, 3, 6)
    assert gen.context_overflow == "truncate" and gen.reasoning is False  # the resource's
    r = http.post("/m/query/", json={"transport": "raw", "prompt": "hi",
                                     "params": {"top_k": 9}})
    assert r.status_code == 200
    gen = service.started[-1][0]
    assert (gen.sampling.top_k, gen.context_overflow, gen.reasoning) == (9, None, None)


# -- an upstream model gets them through the same place ------------------------------------------

class DefaultedUpstream(UpstreamBackend):
    @property
    def card(self) -> ModelCard:
        return dataclasses.replace(super().card, defaults={"temperature": 0.25, "top_k": 4,
                                                           "max_tokens": 5, "stop": "END"})


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": MSG}),
    ("/v1/messages", {"messages": MSG, "max_tokens": 9}),
    ("/api/chat", {"messages": MSG, "stream": False}),
    ("/generate", {"text": "hi"}),
])
def test_an_upstream_model_is_sent_its_defaults(path, body, tmp_path) -> None:
    fake = FakeUpstream()
    registry = ModelRegistry()
    registry.add_backend(DefaultedUpstream("smollm2", UpstreamSettings(
        "http://upstream.test/v1", model="smol"), transport=httpx.MockTransport(fake)))
    app = create_app(registry, store=StoreSettings(url="memory", data_dir=tmp_path))
    with TestClient(app) as http:
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, http.get("/health").json()
            time.sleep(0.01)
        r = http.post(path, json={"model": "smollm2", **body})
        assert r.status_code == 200, r.text
    sent = fake.bodies[-1]
    assert (sent["temperature"], sent["top_k"], sent["stop"]) == (0.25, 4, ["END"])
    # Anthropic's max_tokens is the caller's; Ollama's is capped to the window left.
    assert sent["max_tokens"] == (9 if path == "/v1/messages" else 5)
