"""stream_options.continuous_usage_stats (vLLM's): every chunk of an OpenAI chat or completions
stream carries the usage so far, and the last one agrees with the final usage chunk."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

MSG = [{"role": "user", "content": "Count from one to ten."}]


def _chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _check_running_usage(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Every chunk before the final usage chunk has the usage so far; returns the final one."""
    *running, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] > 0
    prompt = final["usage"]["prompt_tokens"]
    so_far = 0
    for chunk in running:
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == prompt
        assert usage["completion_tokens"] >= so_far
        assert usage["total_tokens"] == prompt + usage["completion_tokens"]
        so_far = usage["completion_tokens"]
    assert running[0]["usage"]["completion_tokens"] <= 1  # the role chunk: nothing generated
    assert so_far == final["usage"]["completion_tokens"]
    return final["usage"]


def test_every_chat_chunk_carries_the_usage_so_far(target) -> None:
    chunks = _chunks(f"{target.base_url}/chat/completions", {
        "model": "smollm2", "messages": MSG, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    usage = _check_running_usage(chunks)
    assert usage["completion_tokens"] == 8
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert len(set(counts)) > 2  # it grows as the tokens come


def test_completions_with_two_choices_count_both(target) -> None:
    chunks = _chunks(f"{target.base_url}/completions", {
        "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 6, "n": 2,
        "temperature": 0.8, "seed": 3, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert _check_running_usage(chunks)["completion_tokens"] == 12


def test_without_it_chunks_carry_null_usage(target) -> None:
    chunks = _chunks(f"{target.base_url}/chat/completions", {
        "model": "smollm2", "messages": MSG, "max_tokens": 4, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]
