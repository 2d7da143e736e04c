"""Sampling values that make no sense are refused with 400 in every dialect, naming the field
as the dialect spells it (core.request.SamplingParams.check, run when a GenerationRequest is
made). No model is needed: the refusal comes before any model is used."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.core.errors import LmserveError
from lmserve.core.request import FieldNames, GenerationRequest, SamplingParams
from lmserve.http.app import create_app
from lmserve.models.registry import ModelRegistry
from lmserve.service import EngineSettings
from tests.unit.chat_service import script
from tests.unit.dialects.native.test_native_contract import client_for as native_client
from tests.unit.dialects.sglang.test_sglang_contract import scripted

TINY = 5e-324  # the smallest float above 0

BAD = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2**40}, "top_k"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": TINY}, "repetition_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: math.inf}}, "logit_bias"),
]

GOOD = [{}, {"temperature": 0.0}, {"temperature": 7.0}, {"top_p": 1.0}, {"top_k": 0},
        {"top_k": 200000}, {"min_p": 1.0}, {"repetition_penalty": 0.01},
        {"repetition_penalty": 10.0}, {"presence_penalty": -2.0}, {"seed": 2**64 - 1},
        {"seed": -(2**63)}, {"logit_bias": {0: -100.0, 7: 100.0}}]


@pytest.mark.parametrize(("values", "key"), BAD)
def test_values_that_make_no_sense_are_refused_by_the_dialects_name(values, key) -> None:
    names = FieldNames("options.", {"repetition_penalty": "repeat_penalty"})
    with pytest.raises(LmserveError) as caught:
        GenerationRequest(prompt="x", sampling=SamplingParams(**values), fields=names)
    assert caught.value.param == names(key) and caught.value.code == "invalid_value"
    assert caught.value.kind.http_status == 400
    assert caught.value.message.startswith(f"'{names(key)}' ")


@pytest.mark.parametrize("values", GOOD)
def test_sane_values_pass(values) -> None:
    GenerationRequest(prompt="x", sampling=SamplingParams(**values))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    registry = ModelRegistry()
    registry.add("tiny", "/nonexistent/tiny.gguf", EngineSettings())
    with TestClient(create_app(registry, load_on_startup=False)) as c:
        yield c


MSG = [{"role": "user", "content": "hi"}]
# (path, body, param, where the error's message is in the dialect's body)
ROUTES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "repetition_penalty": TINY},
     "repetition_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**70}, "seed"),
    ("/v1/responses", {"model": "tiny", "input": "x", "repetition_penalty": TINY},
     "repetition_penalty"),
    ("/v1/messages", {"model": "tiny", "messages": MSG, "max_tokens": 5, "top_k": 2**40},
     "top_k"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "options": {"repeat_penalty": TINY}},
     "options.repeat_penalty"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"presence_penalty": 5}},
     "options.presence_penalty"),
    ("/generate", {"model": "tiny", "text": "x", "sampling_params": {"repetition_penalty": TINY}},
     "sampling_params.repetition_penalty"),
    ("/generate", {"model": "tiny", "text": "x", "sampling_params": {"sampling_seed": -2**70}},
     "sampling_params.sampling_seed"),
    ("/v1/prompt", {"prompt": "x", "generation": {"seed": 2**70}}, "generation.seed"),
]


def _message(body: dict[str, Any]) -> str:
    error = body.get("error", body.get("detail"))
    return error if isinstance(error, str) else error["message"]


@pytest.mark.parametrize(("path", "body", "param"), ROUTES)
def test_each_dialect_refuses_with_its_own_field_name(client, path, body, param) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert _message(r.json()).startswith(f"'{param}' must"), r.text
    error = r.json().get("error")
    if isinstance(error, dict) and "param" in error:
        assert error["param"] == param


def test_native_names_the_params_field() -> None:
    with native_client(scripted(script(["ok"]))) as c:
        r = c.post("/m/query/", json={"messages": MSG, "params": {"repetition_penalty": TINY}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "params.repetition_penalty"
