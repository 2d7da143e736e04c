"""The disk cache across a restart, with real servers: one saves a long prefix's state, a new
process on the same directory loads it instead of computing it, and the greedy output is the
same as a cold server's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmserve.engine.runner import Model
from lmserve.engine.state_file import SUFFIX
from tests.model.conftest import Server, start_server, stop_server

SENTENCE = ("Section {i}. The harbour office logs ship {i} arriving from port {j} with {k} "
            "crates of tea, and the pilot notes calm water near the northern pier. ")


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> Iterator[Model]:
    model = Model(model_path)
    yield model
    model.close()


def document(tokenizer: Model, n_tokens: int, seed: int) -> list[int]:
    text, i = "", 0
    while len(tokenizer.tokenize(text)) < n_tokens:
        text += SENTENCE.format(i=i + seed, j=(i * 7 + seed) % 31, k=(i * 13 + seed) % 97)
        i += 1
    return tokenizer.tokenize(text)[:n_tokens]


def question(tokenizer: Model, text: str) -> list[int]:
    return tokenizer.tokenize(f"\nQuestion: {text}\nAnswer:", add_special=False)


def start(tmp: Path, cache_dir: Path) -> Server:
    tmp.mkdir()
    return start_server(str(tmp), "smollm2", "--parallel", "4", "--ctx", "4096", "--threads", "2",
                        "--data-dir", str(tmp), "--disk-cache", str(cache_dir),
                        "--disk-cache-min-tokens", "256")


def complete(server: Server, prompt: list[int]) -> tuple[dict[str, float], int, float]:
    """Greedy streamed completion: (the first token's top-5 logprobs, cached prompt tokens,
    seconds to the first token)."""
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "logprobs": 5, "stream": True, "stream_options": {"include_usage": True}}
    top: dict[str, float] = {}
    cached, first = -1, 0.0
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and not first:
                first = time.perf_counter() - t0
            for choice in chunk.get("choices") or []:
                if not top and (choice.get("logprobs") or {}).get("top_logprobs"):
                    top = choice["logprobs"]["top_logprobs"][0]
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return top, cached, first


def assert_same_distribution(warm: dict[str, float], cold: dict[str, float]) -> None:
    """The next-token distribution after a loaded state is the one computed from scratch, up
    to float rounding: the loaded prefix was computed in other batches than the cold prompt,
    and llama.cpp's kernels sum a batch of a few rows in another order than a large one. How
    much that moves a logprob depends on the CPU's kernels: under 0.1 on the Intel Xeons
    this suite first ran on, 0.14 on an AMD EPYC without AVX-VNNI (session 12), so the bound
    is 0.3; a state of other tokens moves them by whole nats."""
    shared = warm.keys() & cold.keys()
    assert len(shared) >= 4, (warm, cold)
    assert max(abs(warm[t] - cold[t]) for t in shared) < 0.3, (warm, cold)


def wait_saved(server: Server, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("lmserve_disk_cache_saves_total") < count:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)


@pytest.mark.timeout(600)  # two extra server starts and cold prefills on 2 cores
def test_a_restarted_server_loads_long_prefixes_from_disk(tmp_path: Path, tokenizer: Model,
                                                          server: Server):
    # Sizes kept small for the suite's time; benchmarks/disk_cache_bench.py measures 2000 tokens.
    doc, long_doc = document(tokenizer, 600, 1), document(tokenizer, 900, 2)
    q1, q2 = question(tokenizer, "Which ship came first?"), question(tokenizer, "What cargo?")
    first = start(tmp_path / "a", tmp_path / "states")
    try:
        assert complete(first, doc + q1)[1] == 0
        complete(first, long_doc + q1)
        wait_saved(first, 2)
    finally:
        stop_server(first)

    restarted = start(tmp_path / "b", tmp_path / "states")
    try:
        warm, cached, _ = complete(restarted, doc + q2)
        _, cached_long, warm_ttft = complete(restarted, long_doc + q2)
        assert restarted.metric("lmserve_disk_cache_hits_total") == 2
    finally:
        stop_server(restarted)
    assert cached >= len(doc) and cached_long >= len(long_doc)

    # The shared server runs with the same engine flags and has never seen these documents.
    server.flush()
    cold, cached_cold, _ = complete(server, doc + q2)
    _, _, cold_ttft = complete(server, long_doc + q2)
    assert cached_cold == 0
    assert_same_distribution(warm, cold)
    print(f"\nTTFT for a {len(long_doc)}-token prefix + {len(q2)}-token question: "
          f"cold {cold_ttft:.2f}s, loaded from disk {warm_ttft:.2f}s")


def test_flush_cache_also_clears_the_disk_cache(tmp_path: Path, tokenizer: Model):
    """SGLang's /flush_cache drops the saved states too, and says so; a prefix is then
    computed again rather than loaded."""
    states = tmp_path / "states"
    tmp_path.joinpath("a").mkdir()
    srv = start_server(str(tmp_path / "a"), "smollm2", "--parallel", "2", "--ctx", "1024",
                       "--threads", "2", "--data-dir", str(tmp_path / "a"), "--disk-cache",
                       str(states), "--disk-cache-min-tokens", "64")
    try:
        doc, q = document(tokenizer, 300, 3), question(tokenizer, "Which ship came first?")
        complete(srv, doc + q)
        wait_saved(srv, 1)
        assert list(states.glob(f"*{SUFFIX}"))
        flushed = httpx.post(f"{srv.url}/flush_cache", timeout=60)
        assert flushed.status_code == 200, flushed.text
        assert "1 saved states removed from the disk cache" in flushed.text, flushed.text
        assert not list(states.glob(f"*{SUFFIX}"))
        assert complete(srv, doc + q)[1] == 0  # neither resident nor on disk any more
        assert srv.metric("lmserve_disk_cache_hits_total") == 0
    finally:
        stop_server(srv)


def test_a_conversation_evicted_from_the_slots_comes_back_from_the_ram_tier(
        tmp_path: Path, tokenizer: Model, server: Server):
    """--cache-ram: with one idle slot, two other documents evict the first; its next question
    loads the first's saved state from the RAM tier (no prefix computed again), and the next
    token's distribution is the one computed from scratch."""
    tmp_path.joinpath("a").mkdir()
    srv = start_server(str(tmp_path / "a"), "smollm2", "--parallel", "1", "--cache-slots", "1",
                       "--ctx", "1024", "--threads", "2", "--data-dir", str(tmp_path / "a"),
                       "--cache-ram", "256M")
    docs = [document(tokenizer, 200, seed) for seed in (11, 12, 13)]
    q1, q2 = question(tokenizer, "Which ship came first?"), question(tokenizer, "What cargo?")
    try:
        for doc in docs:  # they share only their first words
            assert complete(srv, doc + q1)[1] < 16
        deadline = time.monotonic() + 60
        while srv.metric("lmserve_ram_cache_saves_total") < 3:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        warm, cached, _ = complete(srv, docs[0] + q2)
        assert cached >= len(docs[0]), srv.log()
        assert srv.metric("lmserve_ram_cache_hits_total") == 1
        assert srv.metric("lmserve_ram_cache_bytes") > 0
    finally:
        stop_server(srv)
    assert not list(Path("/dev/shm").glob(f"lmserve-ram-{srv.proc.pid}-*"))  # gone with it
    server.flush()
    cold, cached_cold, _ = complete(server, docs[0] + q2)
    assert cached_cold == 0
    assert_same_distribution(warm, cold)
