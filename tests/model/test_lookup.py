"""Prompt-lookup speculation on the real model: same greedy output as plain decoding.

A second server runs with --lookup 8; the shared one does not speculate (the default). Each request
starts from an empty KV cache (POST /flush_cache first) on both, because floating-point sums
over a differently laid-out KV pool may pick another token at a near-tie, with or without
speculation. Multi-row verification batches can also round differently from single rows
(docs/architecture.md), so these prompts are ones without such a near-tie; what the tests
check is that drafting, verifying and trimming the KV lose or add no token."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.model.conftest import Server, own_server

TEXT = ("The comittee met on tuesday to discuss the new budjet. Several members argued that the "
        "proposed cuts to the library would hurt students who depend on it for quiet study "
        "space, while others said the savings were neccessary to keep the swimming pool open.")


@pytest.fixture(scope="module")
def lookup_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "lookup", "smollm2", "--parallel", "4", "--ctx",
                          "4096", "--threads", "2", "--lookup", "8", "--store", "memory")


def chat(server: Server, body: dict) -> dict:
    server.flush()
    reply = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def edit_request(**extra) -> dict:
    return {"model": "smollm2", "temperature": 0, "max_tokens": 120, "messages": [
        {"role": "system", "content": "You correct spelling. Reply with the corrected text only."},
        {"role": "user", "content": f"Correct the spelling in this text:\n\n{TEXT}"}], **extra}


def test_speculation_keeps_greedy_output_and_accepts_drafts(lookup_server, server):
    drafted = lookup_server.metric("lmserve_lookup_draft_tokens_total")
    accepted = lookup_server.metric("lmserve_lookup_accepted_tokens_total")
    for extra in ({}, {"stop": ["students"]}, {"max_tokens": 37}):
        fast = chat(lookup_server, edit_request(**extra))
        plain = chat(server, edit_request(**extra))
        assert fast["choices"][0]["message"]["content"] == \
            plain["choices"][0]["message"]["content"]
        assert fast["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert fast["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert lookup_server.metric("lmserve_lookup_draft_tokens_total") > drafted
    assert lookup_server.metric("lmserve_lookup_accepted_tokens_total") > accepted
    assert server.metric("lmserve_lookup_draft_tokens_total") == 0  # off by default


def test_seeded_sampling_is_unchanged_by_speculation(lookup_server, server):
    body = edit_request(temperature=0.7, seed=11, max_tokens=80)
    fast = chat(lookup_server, body)
    plain = chat(server, body)
    assert fast["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_streamed_speculative_output_matches_non_streamed(lookup_server):
    body = edit_request()
    whole = chat(lookup_server, body)["choices"][0]["message"]["content"]
    lookup_server.flush()
    pieces = []
    with httpx.stream("POST", f"{lookup_server.base_url}/chat/completions",
                      json={**body, "stream": True}, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert "".join(pieces) == whole
