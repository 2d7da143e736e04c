"""Ollama: logprobs and top_logprobs on /api/chat and /api/generate, streamed and not, checked
against the official client's types (a real ModelService over a scripted generation)."""

from __future__ import annotations

import json
from typing import Any

import ollama
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmserve.core.errors import LmserveError
from lmserve.core.events import TokenLogprob, TokenOutput, TopLogprob, Usage
from lmserve.dialects.ollama import adapter, routes
from lmserve.dialects.ollama.logprobs import logprob_entries
from lmserve.dialects.ollama.schema import ChatRequest, GenerateRequest
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedRegistry, ScriptedService

USER = [{"role": "user", "content": "Sky?"}]


def lp(piece: bytes, logprob: float, top: int = 0) -> TokenLogprob:
    alts = tuple(TopLogprob(i, piece + bytes([97 + i]), logprob - i - 1) for i in range(top))
    return TokenLogprob(len(piece), piece, logprob, alts)


def steps(top: int) -> list[list[TokenOutput]]:
    """Reasoning, the closing tag, whitespace held back, then the answer; one token a step."""
    pieces = [b"Light", b"</think>", b"\n\n", b"Blue", b" \xe2\x9c"]
    texts = ["Light", "</think>", "\n\n", "Blue", ""]  # the last token ends mid-character
    out = [[TokenOutput(0, text, token_ids=[i], logprobs=[lp(piece, -0.5 - i, top)])]
           for i, (text, piece) in enumerate(zip(texts, pieces))]
    out.append([TokenOutput(0, " \u2713", token_ids=[9], logprobs=[lp(b"\x93", -0.1, top)],
                            finish_reason="stop", usage=Usage(4, 6))])
    return out


def client_for(top: int) -> tuple[TestClient, ScriptedService]:
    service = ScriptedService(steps(top), THINK_TEMPLATE)
    app = FastAPI()
    app.include_router(routes.make_router(lambda: ScriptedRegistry(service)))  # type: ignore
    return TestClient(app), service


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_adapter_maps_logprobs_and_refuses_bad_counts():
    chat = {"model": "m", "messages": USER}
    assert adapter.chat_job(ChatRequest(**chat, logprobs=True)).request.logprobs == 0
    assert adapter.chat_job(ChatRequest(**chat, logprobs=True, top_logprobs=3)
                            ).request.logprobs == 3
    assert adapter.generate_job(GenerateRequest(model="m", prompt="p", logprobs=False,
                                                top_logprobs=0)).request.logprobs is None
    for fields, message in (({"logprobs": True, "top_logprobs": -1}, "between 0 and 20"),
                            ({"top_logprobs": 4}, "needs logprobs: true")):
        with pytest.raises(LmserveError) as caught:
            adapter.generate_job(GenerateRequest(model="m", prompt="p", **fields))
        assert caught.value.param == "top_logprobs" and message in caught.value.message


def test_entries_have_ollamas_shape():
    assert logprob_entries([lp(b"Hi", -0.25, top=1), lp(b"\xe2", -1.0)]) == [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hia", "logprob": -1.25, "bytes": [72, 105, 97]}]},
        {"token": "\ufffd", "logprob": -1.0, "bytes": [226]}]


def test_non_streamed_chat_carries_every_token():
    body = {"model": "m", "messages": USER, "stream": False, "logprobs": True,
            "top_logprobs": 2, "think": True}
    client, service = client_for(2)
    data = client.post("/api/chat", json=body).json()
    assert service.started[0][0].logprobs == 2
    assert data["message"]["thinking"] == "Light" and data["message"]["content"] == "Blue \u2713"
    entries = data["logprobs"]
    assert [e["bytes"] for e in entries] == [list(p) for p in (
        b"Light", b"</think>", b"\n\n", b"Blue", b" \xe2\x9c", b"\x93")]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    parsed = ollama.ChatResponse.model_validate(data)
    assert [e.logprob for e in parsed.logprobs or []] == [-0.5, -1.5, -2.5, -3.5, -4.5, -0.1]


def test_streamed_frames_carry_their_steps_logprobs_even_when_text_is_held():
    client, service = client_for(0)
    body = {"model": "m", "prompt": "Sky?", "logprobs": True}
    frames = lines(client.post("/api/generate", json=body).content)
    done = frames[-1]
    assert done["done"] is True and "logprobs" not in done
    carried = [f for f in frames[:-1] if "logprobs" in f]
    assert len(carried) == 6 and all(len(f["logprobs"]) == 1 for f in carried)
    assert all("top_logprobs" not in f["logprobs"][0] for f in carried)
    held = carried[2]  # the whitespace after the tag: nothing to show yet, logprobs all the same
    assert held["response"] == "" and "thinking" not in held
    for frame in frames:
        ollama.GenerateResponse.model_validate(frame)
    client.post("/api/generate", json={"model": "m", "prompt": "Sky?"})
    assert [gen.logprobs for gen, _, _ in service.started] == [0, None]
