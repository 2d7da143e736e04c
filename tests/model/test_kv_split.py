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
    assert layout(server) == "split"  # auto: 8 slots x 4096 cells of SmolLM2 are 0.7 GiB
    with open(server.log_path, encoding="utf-8") as f:
        log = f.read()
    assert "a KV stream of 4096 cells per slot (auto: 8 x 4096 cells would take 0.70 GiB" in log


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


def test_concurrent_split_streams_answer_as_each_alone(split_server):
    """Requests that overlap run in packed slots (new ones copy the shared system prompt next
    to the running block) and each gets exactly its answer from a run on its own."""
    from concurrent.futures import ThreadPoolExecutor
    questions = ["Name a fruit.", "Name a river.", "Name a planet.", "Name a metal.",
                 "Name a bird.", "Name a tree."]
    alone = {}
    for q in questions:
        split_server.flush()
        alone[q] = texts(ask(split_server, q))
    split_server.flush()
    with ThreadPoolExecutor(len(questions)) as pool:
        together = dict(zip(questions, pool.map(lambda q: texts(ask(split_server, q)), questions)))
    assert together == alone


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
    auto = ModelService("smollm2", model_path, EngineSettings(n_ctx=512, parallel=2, threads=2))
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
