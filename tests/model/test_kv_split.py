"""--kv-split: one KV stream per slot. Prefix sharing copies whole streams and trims them, n > 1
forks copy the prompt, and the answers are the shared-pool server's. The default (auto)
layout splits SmolLM2's small streams."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.model.conftest import Server, own_server

SYSTEM = "You are a terse assistant. Answer in one short sentence. " * 12


@pytest.fixture(scope="module")
def split_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "split", "smollm2", "--parallel", "4", "--ctx",
                          "1024", "--threads", "2", "--kv-split", "--store", "memory")


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "shared", "smollm2", "--parallel", "4", "--ctx",
                          "1024", "--threads", "2", "--kv-layout", "shared", "--store", "memory")


def layout(server: Server) -> str:
    return httpx.get(f"{server.base_url}/models/smollm2", timeout=10).json()["meta"]["kv_layout"]


def test_layout_is_reported_and_auto_splits_a_small_model(split_server, shared_server, server):
    assert (layout(split_server), layout(shared_server)) == ("split", "shared")
    assert layout(server) == "split"  # auto: 4 + 1 slots x 4096 cells of SmolLM2: 0.44 GiB
    with open(server.log_path, encoding="utf-8") as f:
        log = f.read()
    assert "a KV stream of 4096 cells per slot (auto: 5 x 4096 cells would take 0.44 GiB" in log


def ask(server: Server, question: str, **extra) -> dict:
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 24, **extra,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}]}
    reply = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def texts(reply: dict) -> list[str]:
    return [c["message"]["content"] for c in reply["choices"]]


def test_split_streams_share_prefixes_and_answer_like_the_shared_pool(split_server,
                                                                     shared_server):
    first = ask(split_server, "Name a fruit.")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = ask(split_server, "Name a river.")  # copies the first stream, trims the copy
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 100
    split_server.flush()
    for question in ("Name a fruit.", "Name a river."):
        shared_server.flush()
        split_server.flush()
        assert texts(ask(split_server, question)) == texts(ask(shared_server, question))


def test_split_streams_fork_n_choices_and_bound_each_sequence(split_server):
    reply = ask(split_server, "Name a colour.", n=3, temperature=0.9, seed=5)
    assert len(reply["choices"]) == 3 and all(texts(reply))
    # Each slot holds --ctx cells: a prompt plus max_tokens beyond them is refused.
    too_long = httpx.post(f"{split_server.base_url}/completions", timeout=60, json={
        "model": "smollm2", "prompt": "word " * 900, "max_tokens": 200})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


# Greedy answers are a function of the batch's shape as well as of the tokens: a prompt whose
# system part comes from the prefix cache is computed in a smaller batch than the same prompt
# computed whole, and llama.cpp's kernels sum in another order. Measured on SmolLM2 (session 8):
# the same tokens' logprobs move by up to 0.26 nats, and a greedy answer may flip where its two
# best tokens are that close. So concurrent answers are compared with the lone ones token by
# token: equal, with logprobs within CLOSE, up to the first position where the lone run's two
# best tokens were within NEAR_TIE (there either may win; after it the texts may part).
CLOSE = 0.5
NEAR_TIE = 0.75


def steps(reply: dict) -> list[tuple[str, float, float]]:
    """(token, logprob, margin over the runner-up) of each answer token of the first choice."""
    out = []
    for t in reply["choices"][0]["logprobs"]["content"]:
        best = sorted((a["logprob"] for a in t["top_logprobs"]), reverse=True) + [float("-inf")]
        out.append((t["token"], t["logprob"], best[0] - best[1]))
    return out


def agree_until_near_tie(alone: list[tuple[str, float, float]],
                         together: list[tuple[str, float, float]]) -> int:
    """How many tokens the two answers share; fails where they part without a near-tie or
    where a shared token's logprob moved by more than CLOSE."""
    for i in range(max(len(alone), len(together))):
        mine = alone[i] if i < len(alone) else None
        theirs = together[i] if i < len(together) else None
        if mine is None or theirs is None or mine[0] != theirs[0]:
            margin = min(s[2] for s in (mine, theirs) if s is not None)  # one may have ended
            assert margin < NEAR_TIE, f"token {i}: {mine} alone, {theirs} together"
            return i
        assert abs(mine[1] - theirs[1]) <= CLOSE, f"token {i}: {mine} alone, {theirs} together"
    return len(alone)


def test_concurrent_split_streams_answer_as_each_alone(split_server):
    """Requests that overlap run in packed slots (new ones copy the shared system prompt next
    to the running block) and each gets its answer from a run on its own, up to a near-tie."""
    from concurrent.futures import ThreadPoolExecutor
    questions = ["Name a fruit.", "Name a river.", "Name a planet.", "Name a metal.",
                 "Name a bird.", "Name a tree."]
    probe = {"logprobs": True, "top_logprobs": 2}
    alone = {}
    for q in questions:
        split_server.flush()
        alone[q] = ask(split_server, q, **probe)
    split_server.flush()
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: ask(split_server, q, **probe), questions))
    together = dict(zip(questions, replies, strict=True))
    # Six requests over four slots: some shared a prefix another had computed.
    assert any(r["usage"]["prompt_tokens_details"]["cached_tokens"] > 100 for r in replies)
    shared = {q: agree_until_near_tie(steps(alone[q]), steps(together[q])) for q in questions}
    # The answers are mostly decided far from any tie: most match whole.
    assert sum(n == len(steps(alone[q])) for q, n in shared.items()) >= len(questions) // 2, \
        shared


def test_auto_falls_back_to_the_shared_pool_when_streams_cannot_be_made(model_path, monkeypatch):
    import asyncio

    from lmserve import service as service_module
    from lmserve.engine.runner import Context
    from lmserve.service import EngineSettings, ModelService

    asked: list[bool] = []

    def context(model, **params):  # llama.cpp refusing the split context, as out of memory
        asked.append(params["kv_unified"])
        if not params["kv_unified"]:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        return Context(model, **params)

    monkeypatch.setattr(service_module, "Context", context)
    loop = asyncio.new_event_loop()
    auto = ModelService("smollm2", model_path, EngineSettings(n_ctx=512, parallel=2, threads=2,
                                                              prefill_lane=0))
    try:
        auto.load(loop)
        assert asked == [False, True] and auto.ready and not auto.layout.split
        assert "a stream per slot could not be made: llama.cpp could not create a context" \
            in auto.layout.reason
        assert auto.client is not None and auto.client.core.pool.idle_tokens == 512 // 4
    finally:
        auto.close()
    forced = ModelService("smollm2", model_path,
                          EngineSettings(n_ctx=512, parallel=2, threads=2, kv_layout="split"))
    with pytest.raises(RuntimeError, match="could not create a context"):
        forced.load(loop)  # asked for split streams: no silent fallback
    assert forced.state == "failed"
    for service in (auto, forced):
        if service.model is not None:
            service.model.close()
    loop.close()
