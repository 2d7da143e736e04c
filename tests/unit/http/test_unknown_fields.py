"""The unknown-field policy: fields of a dialect's real API that lmserve does not implement
are refused by name; fields no schema knows are ignored and named in X-Lmserve-Ignored-Fields."""

from __future__ import annotations

from typing import Any

import pytest

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.dialects.anthropic import routes as anthropic_routes
from lmserve.dialects.anthropic.schema import MessageRequest
from lmserve.dialects.ollama import routes as ollama_routes
from lmserve.dialects.openai import routes as openai_routes
from lmserve.dialects.openai.schema import ChatCompletionRequest
from lmserve.http.fields import IGNORED_FIELDS_HEADER, unknown_fields
from tests.unit.chat_service import scripted_client

MSG = [{"role": "user", "content": "hi"}]


def test_unknown_fields_are_found_at_every_depth() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"},
                                       {"role": "user", "content": "y", "colour": 1}],
            "stream_options": {"include_usage": True, "foo": 2}, "zzz": 3,
            "tools": [{"type": "function", "anything": {"goes": 1}}]}
    assert unknown_fields(ChatCompletionRequest, body) == [
        "messages[1].colour", "stream_options.foo", "zzz"]
    assert unknown_fields(ChatCompletionRequest, [1, 2]) == []


def test_a_strict_model_reports_nothing_itself() -> None:
    assert unknown_fields(MessageRequest, {"model": "m", "max_tokens": 1, "messages": MSG}) == []


def _openai(body: dict[str, Any]):
    client, _ = scripted_client(openai_routes.make_router, ["Hi"], CHATML_TEMPLATE)
    return client.post("/v1/chat/completions", json={"model": "m", "messages": MSG,
                                                     **body})


def test_openai_names_the_ignored_fields_in_a_header() -> None:
    r = _openai({"store": True, "stream_options": {"include_usage": True, "bogus": 1},
                 "stream": True, "weird,name\n": 1})
    assert r.status_code == 200
    assert r.headers[IGNORED_FIELDS_HEADER] == "store,stream_options.bogus,weird\\u002cname\\n"


def test_nothing_ignored_no_header() -> None:
    r = _openai({"temperature": 0})
    assert r.status_code == 200 and IGNORED_FIELDS_HEADER not in r.headers


@pytest.mark.parametrize(("body", "param"), [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"verbosity": "low"}, "verbosity"),
])
def test_openai_refuses_api_fields_it_does_not_implement(body, param) -> None:
    r = _openai(body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_parameter"


def test_openai_accepts_the_values_that_change_nothing() -> None:
    r = _openai({"modalities": ["text"], "verbosity": "medium"})
    assert r.status_code == 200


def test_ollama_names_them_too_and_anthropic_refuses_them_as_anthropic_does() -> None:
    client, _ = scripted_client(ollama_routes.make_router, ["Hi"], CHATML_TEMPLATE)
    r = client.post("/api/chat", json={"model": "m", "messages": MSG, "stream": False,
                                       "shiny": True})
    assert r.status_code == 200 and r.headers[IGNORED_FIELDS_HEADER] == "shiny"
    client, _ = scripted_client(anthropic_routes.make_router, ["Hi"], CHATML_TEMPLATE)
    r = client.post("/v1/messages", json={"model": "m", "messages": MSG, "max_tokens": 4,
                                          "shiny": True})
    assert r.status_code == 400 and "shiny" in r.json()["error"]["message"]
