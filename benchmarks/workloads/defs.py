"""The workloads of issue 19, each a coroutine that drives one server and returns what every
request saw. Every text is built from a seed, and the runner gives each round its own seed, so
no round warms a cache for the next one; both servers of a round get the same texts.

Words come from lmserve.bench.prompts.WORDS: common English words that BPE vocabularies
encode as one token after a space, so N words are about N tokens (usage gives the exact
counts, and those are what the figures use).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.workloads.client import Result, chat
from lmserve.bench.prompts import WORDS


@dataclass
class Outcome:
    results: list[Result]
    wall: float  # seconds from the first request sent to the last answer
    notes: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[httpx.AsyncClient, str, int, "Scale"], Awaitable[Outcome]]


@dataclass(frozen=True)
class Scale:
    """The sizes of the workloads (the issue's, unless a quick run asks for less)."""

    conversations: int = 48
    turns: int = 6
    answer_tokens: int = 48
    questions: int = 64
    doc_words: int = 1400
    decode_seconds: float = 60.0
    # SmolLM2 prefills about 300 tokens/s on this 2-core VM: a 1,500-token prompt every 4 s
    # would saturate both servers, and the backlog, not the scheduler, would decide the figures
    long_every: float = 10.0
    agents: int = 16
    agent_steps: int = 5
    edit_requests: int = 8
    uniform_levels: tuple[int, ...] = (1, 4, 8, 16)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sentences(rng: random.Random, n_words: int) -> str:
    """n_words words cut into sentences of 8-16 words."""
    out: list[str] = []
    left = n_words
    while left > 0:
        k = min(left, rng.randint(8, 16))
        s = words(rng, k)
        out.append(s[0].upper() + s[1:] + ".")
        left -= k
    return " ".join(out)


async def closed_loop(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    """Run `jobs` with at most `concurrency` at a time, in order."""
    queue: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            await (queue.get_nowait())()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- 1. uniform ---------------------------------------------------------------------------------
async def uniform(client: httpx.AsyncClient, base: str, seed: int, scale: Scale) -> Outcome:
    """Random 128-word prompts, 128 output tokens (end-of-generation ignored), at each level of
    scale.uniform_levels, 2 x c requests a level; the level is in each result's kind."""
    rng = random.Random(seed)
    results: list[Result] = []
    t0 = time.monotonic()
    for c in scale.uniform_levels:
        async def one(text: str, c: int = c) -> None:
            results.append(await chat(client, base, {
                "messages": [{"role": "user", "content": text}], "max_tokens": 128,
                "temperature": 0, "ignore_eos": True}, kind=f"c{c}"))
        prompts = [f"Request {seed}-{c}-{i}: {words(rng, 128)}" for i in range(2 * c)]
        await closed_loop([lambda p=p: one(p) for p in prompts], c)
    return Outcome(results, time.monotonic() - t0)


# -- 2. multi-turn chat -------------------------------------------------------------------------
async def multiturn(client: httpx.AsyncClient, base: str, seed: int, scale: Scale) -> Outcome:
    """scale.conversations conversations of scale.turns turns under one 400-word system prompt,
    each user turn 50-150 words, answers up to scale.answer_tokens tokens, c=8. A finished
    turn queues its conversation's next turn at the back, so others run in between; each
    request sends back the answers the server gave (the client's view of the history)."""
    rng = random.Random(seed)
    system = f"Session {seed}. " + sentences(rng, 400)
    histories = [[{"role": "system", "content": system}] for _ in range(scale.conversations)]
    users = [[sentences(rng, rng.randint(50, 150)) for _ in range(scale.turns)]
             for _ in range(scale.conversations)]
    results: list[Result] = []
    ready: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for j in range(scale.conversations):
        ready.put_nowait((j, 0))
    remaining = scale.conversations * scale.turns

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            try:
                j, k = await asyncio.wait_for(ready.get(), timeout=0.05)
            except TimeoutError:
                continue
            history = histories[j]
            history.append({"role": "user", "content": users[j][k]})
            r = await chat(client, base, {"messages": history, "temperature": 0,
                                          "max_tokens": scale.answer_tokens}, kind=f"turn{k}")
            results.append(r)
            history.append({"role": "assistant", "content": r.text})
            remaining -= 1
            if k + 1 < scale.turns:
                ready.put_nowait((j, k + 1))

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(8)))
    return Outcome(results, time.monotonic() - t0)


# -- 3. shared long prefix ----------------------------------------------------------------------
def _document(rng: random.Random, seed: int, n_words: int) -> str:
    return f"Document {seed}. " + sentences(rng, n_words)


async def shared_prefix(client: httpx.AsyncClient, base: str, seed: int,
                        scale: Scale) -> Outcome:
    """One ~1,500-token document as the system prompt, scale.questions different questions
    arriving together, c=8, 32 answer tokens each."""
    rng = random.Random(seed)
    doc = _document(rng, seed, scale.doc_words)
    questions = [f"Question {i}: {words(rng, rng.randint(10, 30))}?" for i in
                 range(scale.questions)]
    results: list[Result] = []

    async def ask(q: str) -> None:
        results.append(await chat(client, base, {
            "messages": [{"role": "system", "content": doc}, {"role": "user", "content": q}],
            "max_tokens": 32, "temperature": 0}, kind="question"))

    t0 = time.monotonic()
    await closed_loop([lambda q=q: ask(q) for q in questions], 8)
    return Outcome(results, time.monotonic() - t0)


# -- 4. long prompts arriving during decoding ---------------------------------------------------
async def long_decode(client: httpx.AsyncClient, base: str, seed: int, scale: Scale) -> Outcome:
    """6 streams decode continuously (256 tokens a request, end-of-generation ignored, the next
    request at once) while a ~1,500-token prompt (16 answer tokens) arrives every
    scale.long_every seconds, for scale.decode_seconds. Results of kind "decoder" are the
    running streams whose gaps the issue's inter-token target is about."""
    rng = random.Random(seed)
    results: list[Result] = []
    stop_at = time.monotonic() + scale.decode_seconds

    async def decoder(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            text = f"Stream {seed}-{i}-{n}: {words(rng, 40)}"
            n += 1
            results.append(await chat(client, base, {
                "messages": [{"role": "user", "content": text}], "max_tokens": 256,
                "temperature": 0, "ignore_eos": True}, kind="decoder"))

    async def arrivals() -> None:
        tasks = []
        k = 0
        await asyncio.sleep(2.0)  # the decoders are running by then
        while time.monotonic() < stop_at:
            doc = _document(rng, seed * 1000 + k, scale.doc_words)
            k += 1
            tasks.append(asyncio.create_task(chat(client, base, {
                "messages": [{"role": "user", "content": doc + "\nSummarize."}],
                "max_tokens": 16, "temperature": 0}, kind="long")))
            await asyncio.sleep(scale.long_every)
        results.extend(await asyncio.gather(*tasks))

    t0 = time.monotonic()
    await asyncio.gather(*(decoder(i) for i in range(6)), arrivals())
    return Outcome(results, time.monotonic() - t0)


# -- 5. agent loop ------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Search the project's files for a phrase.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the project.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
]


async def agents(client: httpx.AsyncClient, base: str, seed: int, scale: Scale) -> Outcome:
    """scale.agents agents at c=8, each scale.agent_steps tool round trips: the model must call a
    tool (tool_choice required), the client answers with a ~150-word tool result, and the next
    request carries the whole growing conversation, the model's own calls included."""
    rng = random.Random(seed)
    system = "You are a coding agent. Use the tools to find the answer. " + sentences(rng, 150)
    results: list[Result] = []
    no_call = 0

    async def agent(a: int) -> None:
        nonlocal no_call
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Task {seed}-{a}: {sentences(rng, 40)}"}]
        for step in range(scale.agent_steps):
            r = await chat(client, base, {"messages": messages, "tools": TOOLS,
                                          "tool_choice": "required", "temperature": 0,
                                          "max_tokens": 64}, kind=f"step{step}")
            results.append(r)
            calls = [c for c in r.tool_calls if c["function"]["name"]]
            if not calls:  # no call parsed: answer as if the model had searched
                no_call += 1
                calls = [{"id": f"call_{a}_{step}", "type": "function",
                          "function": {"name": "search", "arguments": json.dumps(
                              {"query": words(rng, 3)})}}]
            for i, c in enumerate(calls):
                c["id"] = c["id"] or f"call_{a}_{step}_{i}"
            messages.append({"role": "assistant", "content": r.text or None,
                             "tool_calls": calls})
            for c in calls:
                messages.append({"role": "tool", "tool_call_id": c["id"],
                                 "content": json.dumps({"result": sentences(rng, 150)})})

    t0 = time.monotonic()
    await closed_loop([lambda a=a: agent(a) for a in range(scale.agents)], 8)
    return Outcome(results, time.monotonic() - t0, {"answers_without_a_call": no_call})


# -- 6. edit / copy-heavy output ----------------------------------------------------------------
def _edit_texts(seed: int, n: int) -> list[str]:
    """Prose to rewrite: paragraphs of the Python language reference that the standard
    library ships (pydoc_data.topics), real sentences a model can copy; a different draw for
    every seed."""
    from pydoc_data.topics import topics
    paragraphs = sorted({" ".join(p.split()) for text in topics.values()
                         for p in text.split("\n\n")})
    texts = [p for p in paragraphs if 400 <= len(p) <= 1200 and p[0].isalpha()]
    return random.Random(seed).sample(texts, n)


async def edit(client: httpx.AsyncClient, base: str, seed: int, scale: Scale) -> Outcome:
    """Rewrite a given paragraph with one small change, 256 answer tokens at most, at c=1
    (edit_requests / 2 requests) and c=4 (edit_requests; the level is in each result's
    kind): output that mostly repeats the prompt, where prompt lookup and n-gram
    speculation draft well."""
    texts = _edit_texts(seed, scale.edit_requests + scale.edit_requests // 2)
    results: list[Result] = []
    t0 = time.monotonic()
    half = scale.edit_requests // 2
    for c, batch in ((1, texts[:half]), (4, texts[half:half + scale.edit_requests])):
        async def one(text: str, c: int = c) -> None:
            results.append(await chat(client, base, {"messages": [{"role": "user", "content": (
                "Repeat the following text exactly, word for word, but write 'module' "
                f"instead of 'the':\n\n{text}")}], "max_tokens": 256, "temperature": 0},
                kind=f"c{c}"))
        await closed_loop([lambda t=t: one(t) for t in batch], c)
    return Outcome(results, time.monotonic() - t0)


WORKLOADS: dict[str, Runner] = {
    "uniform": uniform, "multiturn": multiturn, "shared_prefix": shared_prefix,
    "long_decode": long_decode, "agents": agents, "edit": edit,
}
