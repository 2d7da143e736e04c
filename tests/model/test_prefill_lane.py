"""The prefill lane (engine.lane) on the real model: a long prompt that arrives while others
decode is computed in the side context on its own thread, its KV handed back to its slot, and
it answers as the same prompt computed in the engine's own steps; the decoders go on meanwhile;
a client that leaves while its prompt is in the lane frees everything."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.model.conftest import Server, own_server
from tests.model.test_kv_split import agree_until_near_tie

WORDS = ("river stone cloud paper light window garden music table bridge market winter "
         "letter forest engine harbor candle silver morning planet").split()


def document(seed: int, n: int = 450) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def lane_server(tmp_path_factory: pytest.TempPathFactory):
    yield from own_server(tmp_path_factory, "lane", "smollm2", "--parallel", "4", "--ctx", "2048",
                          "--cache-slots", "4", "--threads", "2", "--prefill-lane", "1",
                          "--prefill-lane-min", "64")


@pytest.fixture(scope="module")
def inline_server(tmp_path_factory: pytest.TempPathFactory):
    yield from own_server(tmp_path_factory, "inline", "smollm2", "--parallel", "4", "--ctx",
                          "2048", "--threads", "2", "--prefill-lane", "0")


def chat_body(text: str, **extra) -> dict:
    return {"model": "smollm2", "temperature": 0, "messages": [{"role": "user", "content": text}],
            **extra}


async def decoder(client: httpx.AsyncClient, server: Server, i: int, started: asyncio.Event,
                  n_tokens: int = 160) -> list[str]:
    """A streamed raw completion of n_tokens (its prompt shares no prefix with the tests'
    others); `started` is set at its first token."""
    pieces: list[str] = []
    body = {"model": "smollm2", "prompt": f"Story {i} about a lighthouse:", "stream": True,
            "max_tokens": n_tokens, "ignore_eos": True, "temperature": 0}
    async with client.stream("POST", f"{server.base_url}/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0].get("text"):
                pieces.append(chunk["choices"][0]["text"])
                started.set()
    return pieces


def long_while_decoding(server: Server, body: dict,
                        path: str = "/chat/completions") -> tuple[dict, list[list[str]]]:
    """Two decoders stream; once both have tokens, the long prompt's body is posted (not
    streamed) to `path`."""
    async def run() -> tuple[dict, list[list[str]]]:
        async with httpx.AsyncClient(timeout=600) as client:
            events = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(decoder(client, server, i, e))
                     for i, e in enumerate(events)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 300)
            reply = await client.post(f"{server.base_url}{path}", json=body)
            assert reply.status_code == 200, reply.text
            return reply.json(), await asyncio.gather(*tasks)
    return asyncio.run(run())


def completion_steps(reply: dict) -> list[tuple[str, float, float]]:
    """steps() for a completions answer: (token, logprob, margin over the runner-up)."""
    logprobs = reply["choices"][0]["logprobs"]
    out = []
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                   logprobs["top_logprobs"], strict=True):
        best = sorted(top.values(), reverse=True) + [float("-inf")]
        out.append((token, logprob, best[0] - best[1]))
    return out


def test_a_long_prompt_computed_in_the_lane_answers_as_computed_inline(lane_server,
                                                                       inline_server):
    """A raw prompt that shares nothing with the decoders' (so the lane computes all of it):
    the lane's KV equals the engine's own (its chunks and threads change no sum), and the only
    difference left is the last prompt token's row, which the engine computes beside the
    decoders' rows rather than at the end of a prompt chunk (up to ~0.25 nats on SmolLM2)."""
    text = "Notes. " + document(1) + "\nThe word that comes up most is"
    probe = {"model": "smollm2", "prompt": text, "max_tokens": 12, "temperature": 0,
             "logprobs": 2}
    jobs = lane_server.metric("lmserve_prefill_lane_jobs_total")
    lane_tokens = lane_server.metric("lmserve_prefill_lane_tokens_total")

    aside, streams = long_while_decoding(lane_server, probe, "/completions")
    assert all(len(s) >= 150 for s in streams)  # the decoders went on to their end
    usage = aside["usage"]
    assert lane_server.metric("lmserve_prefill_lane_jobs_total") == jobs + 1
    # the lane computed the whole prompt but its last token
    assert lane_server.metric("lmserve_prefill_lane_tokens_total") - lane_tokens == \
        usage["prompt_tokens"] - 1
    reply = httpx.post(f"{inline_server.base_url}/completions", timeout=300, json=probe)
    assert reply.status_code == 200
    inline = reply.json()
    assert inline["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert inline_server.metric("lmserve_prefill_lane_jobs_total") == 0
    agree_until_near_tie(completion_steps(inline), completion_steps(aside))


def test_a_prompt_that_shares_a_prefix_carries_it_into_the_lane(lane_server):
    """The second prompt reuses the first one's KV (a long shared document) and the lane
    computes only the rest: the copy into the side context carried the prefix."""
    lane_server.flush()
    doc = document(2, 300)
    first = httpx.post(f"{lane_server.base_url}/chat/completions", timeout=300,
                       json=chat_body(doc + "\nName one word.", max_tokens=4))
    assert first.status_code == 200
    lane_tokens = lane_server.metric("lmserve_prefill_lane_tokens_total")
    reply, _ = long_while_decoding(lane_server, chat_body(
        doc + "\nName one word.\n" + document(3, 300) + "\nName another word.", max_tokens=4))
    usage = reply["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 300
    assert lane_server.metric("lmserve_prefill_lane_tokens_total") - lane_tokens == \
        usage["prompt_tokens"] - cached - 1


def test_a_client_leaving_while_its_prompt_is_in_the_lane_frees_it(lane_server):
    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            events = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(decoder(client, lane_server, i, e, n_tokens=60))
                     for i, e in enumerate(events)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 300)
            body = chat_body(document(4, 700) + "\nSummarize.", max_tokens=50, stream=True)
            async with client.stream("POST", f"{lane_server.base_url}/chat/completions",
                                     json=body) as r:
                assert r.status_code == 200
            # left before its first token: its prompt was still being computed
            await asyncio.gather(*tasks)

    asyncio.run(run())
    lane_server.assert_generation_stops()
    # and the lane takes the next long prompt as before
    jobs = lane_server.metric("lmserve_prefill_lane_jobs_total")
    reply, _ = long_while_decoding(lane_server, chat_body(document(5) + "\nSummarize.",
                                                          max_tokens=4))
    assert reply["choices"][0]["message"]["content"]
    assert lane_server.metric("lmserve_prefill_lane_jobs_total") == jobs + 1
