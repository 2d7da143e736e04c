"""Ollama logprobs and top_logprobs on /api/chat and /api/generate, streamed and not, with the
official ollama client and raw NDJSON, against the real server and SmolLM2."""

from __future__ import annotations

import json
from typing import Any

import httpx
import ollama
import pytest

MSG = [{"role": "user", "content": "Name three colors."}]
OPTIONS = {"temperature": 0, "num_predict": 12}


def stream_lines(server_url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=server_url, timeout=120) as http:
        r = http.post(path, json=body)
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines()]


def test_chat_logprobs_with_alternatives(server):
    oc = ollama.Client(host=server.url, timeout=120)
    r = oc.chat(model="smollm2", messages=MSG, options=OPTIONS, logprobs=True, top_logprobs=3)
    entries = r.logprobs or []
    assert len(entries) == r.eval_count  # every generated token, a final end-of-turn too
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs or []) == 3
        values = [alt.logprob for alt in entry.top_logprobs or []]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
    assert "".join(e.token for e in entries).startswith(r.message.content)
    plain = oc.chat(model="smollm2", messages=MSG, options=OPTIONS)
    assert plain.logprobs is None and plain.message.content == r.message.content


def test_streamed_chunks_add_up_to_the_whole(server):
    body = {"model": "smollm2", "messages": MSG, "options": OPTIONS, "logprobs": True,
            "stream": False}
    whole = httpx.post(f"{server.url}/api/chat", json=body, timeout=120).json()
    frames = stream_lines(server.url, "/api/chat", {**body, "stream": True})
    streamed = [entry for frame in frames for entry in frame.get("logprobs", [])]
    assert streamed == whole["logprobs"]
    assert all("top_logprobs" not in entry for entry in streamed)
    assert all(bytes(e["bytes"]).decode("utf-8", "replace") == e["token"] for e in streamed)
    assert "logprobs" not in frames[-1] and frames[-1]["done"] is True


def test_generate_logprobs_and_refusals(server):
    oc = ollama.Client(host=server.url, timeout=120)
    parts = list(oc.generate(model="smollm2", prompt="The sky is", options=OPTIONS, raw=True,
                             logprobs=True, top_logprobs=1, stream=True))
    tokens = [entry.token for part in parts for entry in part.logprobs or []]
    text = "".join(part.response or "" for part in parts)
    assert text and "".join(tokens).startswith(text)  # a raw prompt's reply: every token shows
    assert len(tokens) == parts[-1].eval_count
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}):
        with pytest.raises(ollama.ResponseError) as caught:
            oc.generate(model="smollm2", prompt="x", options=OPTIONS, **bad)
        assert caught.value.status_code == 400 and "top_logprobs" in caught.value.error
