"""/tokenize and /detokenize (vLLM's shape, llama-server's names read too) over a scripted
backend whose stub vocabulary has one token per character."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.dialects.openai import routes
from lmserve.models.registry import ModelRegistry
from tests.unit.chat_service import ScriptedService

CODES = [ord(c) for c in "héllo"]


@pytest.fixture()
def http() -> TestClient:
    registry = ModelRegistry()
    registry.add_backend(ScriptedService([], CHATML_TEMPLATE))  # type: ignore[arg-type]
    app = FastAPI()
    app.include_router(routes.make_router(lambda: registry))
    return TestClient(app)


def error(r: Any) -> dict[str, Any]:
    return {"status": r.status_code, **{k: r.json()["error"][k] for k in ("param", "code")}}


def test_tokenize_answers_vllm_s_shape_for_either_name_of_the_text(http):
    vllm = http.post("/tokenize", json={"model": "m", "prompt": "héllo"}).json()
    assert vllm == {"count": 5, "max_model_len": 4096, "tokens": CODES}
    # llama-server's names, no model: the server's only model
    assert http.post("/tokenize", json={"content": "héllo", "add_special": True}).json() == vllm
    both = {"prompt": "héllo", "content": "héllo", "add_special": False,
            "add_special_tokens": False, "return_token_strs": True}
    assert http.post("/tokenize", json=both).json()["token_strs"] == list("héllo")


def test_detokenize_answers_the_text_under_vllm_s_and_llama_server_s_keys(http):
    r = http.post("/detokenize", json={"model": "m", "tokens": CODES})
    assert r.json() == {"prompt": "héllo", "content": "héllo"}
    assert http.post("/detokenize", json={"tokens": []}).json()["prompt"] == ""


@pytest.mark.parametrize("path,body,param,code", [
    ("/tokenize", {"model": "m"}, "prompt", "missing_required_parameter"),
    ("/tokenize", {"prompt": "a", "content": "b"}, "content", "invalid_value"),
    ("/tokenize", {"prompt": "a", "add_special": True, "add_special_tokens": False},
     "add_special", "invalid_value"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "prompt": "a"},
     "messages", "invalid_value"),
    ("/tokenize", {"messages": []}, "messages", "invalid_value"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}],
                   "continue_final_message": True}, "add_generation_prompt", "invalid_value"),
    ("/tokenize", {"content": "a", "with_pieces": True}, "with_pieces", "unsupported_parameter"),
    ("/detokenize", {"tokens": [97, 0x110000]}, "tokens", "invalid_value"),
])
def test_bad_bodies_are_400s_naming_the_field(http, path, body, param, code):
    assert error(http.post(path, json=body)) == {"status": 400, "param": param, "code": code}


def test_a_negative_id_and_an_unknown_model(http):
    r = http.post("/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tokens")
    r = http.post("/tokenize", json={"model": "nope", "prompt": "a"})
    assert error(r) == {"status": 404, "param": "model", "code": "model_not_found"}


HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("extra, rendered", [
    ({}, HI),
    ({"add_generation_prompt": False}, HI[: -len("<|im_start|>assistant\n")]),
    ({"add_generation_prompt": False, "continue_final_message": True,
      "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1, 2,"}]},
     HI + "1, 2,"),
])
def test_a_chat_is_tokenized_as_the_chat_route_renders_it(http, extra, rendered):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    chat = http.post("/tokenize", json=body).json()
    text = http.post("/tokenize", json={"model": "m", "prompt": rendered}).json()
    assert chat == text and chat["count"] == len(chat["tokens"]) > 0
    assert chat["max_model_len"] == 4096
