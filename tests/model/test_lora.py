"""LoRA adapters on the real model: a random adapter written for SmolLM2 (scripts/
make_test_lora.py) changes greedy output, and requests running at the same time under
different adapters each get what they get alone.

Exactly what they get alone when each adapter set has one sequence: every decode step then
holds one sequence, as a single run's steps do. With several sequences per step, llama.cpp's
results move with the batch's composition (base model included: a 9-request mix moves token
logprobs by up to ~0.15 here), so two near-tied greedy candidates can swap; that larger mix is
compared token by token and may part only where the two runs' candidates were within TIE.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmserve.core.lora import LoraSpec
from lmserve.service import EngineSettings, ModelService
from tests.model.conftest import Server, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("My favourite breakfast is", "Once upon a time")
N_TOKENS = 12
TIE = 0.35  # nats: twice the largest logprob shift batching was seen to cause
Run = list[tuple[str, dict[str, float]]]  # (token, its top-2 alternatives' logprobs)
# One request per adapter set: the base model, two aliases and a per-request scale.
CHOICES: list[tuple[str, dict[str, Any]]] = [
    ("smollm2", {}), ("smollm2:style", {}), ("smollm2:half", {}),
    ("smollm2", {"lora": {"name": "style", "scale": 0.25}})]


def make_adapter(base: str, out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_lora.py"), base, str(out),
                    "--seed", "1"], check=True, timeout=120)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Path:
    out = tmp_path_factory.mktemp("lora") / "style.gguf"
    make_adapter(model_path, out)
    return out


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, adapter: Path) -> Iterator[Server]:
    tmp = str(tmp_path_factory.mktemp("lora-server"))
    srv = start_server(tmp, "smollm2", "--parallel", "4", "--ctx", "2048", "--threads", "2",
                       "--data-dir", tmp, "--lora", f"style={adapter}",
                       "--lora", f"half={adapter}:0.5")
    yield srv
    stop_server(srv)


@pytest.fixture()
def http(lora_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lora_server.url, timeout=300) as c:
        yield c


def complete(http: httpx.Client, prompt: str, model: str = "smollm2", **extra: Any) -> Run:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                           "max_tokens": N_TOKENS, "logprobs": 2, **extra})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    return list(zip(logprobs["tokens"], logprobs["top_logprobs"]))


def at_once(http: httpx.Client, jobs: list[tuple[str, str, dict[str, Any]]]) -> list[Run]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: complete(http, job[0], job[1], **job[2]), jobs))


def text(run: Run) -> str:
    return "".join(token for token, _ in run)


def parting_gap(a: Run, b: Run) -> float | None:
    """None when the runs agree; else how close their tokens were where they parted."""
    for (token_a, top_a), (token_b, top_b) in zip(a, b):
        if token_a != token_b:
            return min(abs(top_a[token_a] - top_a.get(token_b, -math.inf)),
                       abs(top_b[token_b] - top_b.get(token_a, -math.inf)))
    return None if len(a) == len(b) else math.inf


def test_one_request_per_adapter_set_at_once_matches_single_runs_exactly(http, lora_server):
    for prompt in PROMPTS:
        http.post("/flush_cache")
        jobs = [(prompt, model, extra) for model, extra in CHOICES]
        alone = [complete(http, *job[:2], **job[2]) for job in jobs]
        assert text(alone[0]) != text(alone[1])  # the adapter changes greedy output
        assert len({repr(run) for run in alone}) == len(alone)  # each set its own logprobs
        http.post("/flush_cache")
        assert at_once(http, jobs) == alone  # tokens and logprobs, to the last digit
    assert lora_server.metric("lmserve_adapter_switches_total") > 0
    metrics = http.get("/metrics").text
    assert 'lmserve_adapter_steps_total{adapters="style",model="smollm2"}' in metrics
    assert 'lmserve_adapter_steps_total{adapters="style@0.25",model="smollm2"}' in metrics


def test_a_larger_mix_parts_from_single_runs_only_at_near_ties(http):
    jobs = [(prompt, model, extra) for prompt in PROMPTS for model, extra in CHOICES]
    alone = [complete(http, *job[:2], **job[2]) for job in jobs]
    mixed = at_once(http, jobs)  # 8 at once on 4 slots: groups of one and two interleave
    for job, a, b in zip(jobs, alone, mixed):
        gap = parting_gap(a, b)
        assert gap is None or gap < TIE, (job, text(a), text(b), gap)


def test_lora_fields_scales_and_model_names_agree(http):
    def fresh(model: str = "smollm2", **extra: Any) -> Run:
        # From an empty cache: a reused prefix moves logprobs (batch numerics, see above).
        http.post("/flush_cache")
        return complete(http, PROMPTS[0], model, **extra)

    prompt = PROMPTS[0]
    assert fresh(lora="style") == fresh("smollm2:style")
    assert fresh(lora=[{"name": "style", "scale": 0.5}]) == fresh("smollm2:half")
    assert fresh(lora={"name": "style", "scale": 0}) == fresh()
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
            "max_tokens": 8}
    base_chat = http.post("/v1/chat/completions", json={"model": "smollm2", **chat}).json()
    style_chat = http.post("/v1/chat/completions", json={"model": "smollm2:style", **chat}).json()
    assert style_chat["model"] == "smollm2:style"
    assert style_chat["choices"][0]["message"] != base_chat["choices"][0]["message"]
    vectors = [http.post("/v1/embeddings", json={"model": m, "input": prompt}).json()
               ["data"][0]["embedding"] for m in ("smollm2", "smollm2:style")]
    assert vectors[0] != vectors[1]


def test_models_list_the_adapters(http, adapter):
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["smollm2:style"]["parent"] == "smollm2"
    assert cards["smollm2:style"]["root"] == str(adapter)
    assert cards["smollm2:half"]["lora"] == {"alias": "half", "scale": 0.5}


def test_sglang_lora_path_per_prompt(http):
    r = http.post("/generate", json={
        "text": list(PROMPTS), "lora_path": ["style", None], "return_logprob": True,
        "top_logprobs_num": 2, "return_text_in_logprobs": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": N_TOKENS}})
    assert r.status_code == 200, r.text
    texts = [item["text"] for item in r.json()]
    assert texts == [text(complete(http, PROMPTS[0], "smollm2:style")),
                     text(complete(http, PROMPTS[1]))]
    assert texts[0] != text(complete(http, PROMPTS[0]))


def test_unknown_adapters_are_refused_in_each_dialect(http):
    user = [{"role": "user", "content": "hi"}]
    r = http.post("/v1/chat/completions", json={"model": "smollm2:nope", "messages": user})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "smollm2:style" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "lora": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
    r = http.post("/generate", json={"text": "x", "lora_path": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                  json={"model": "smollm2:nope", "max_tokens": 4, "messages": user})
    assert r.status_code == 404 and r.json()["type"] == "error"
    r = http.post("/api/chat", json={"model": "smollm2:nope", "messages": user})
    assert r.status_code == 404 and "error" in r.json()
    r = http.post("/api/chat", json={"model": "smollm2:style", "messages": user,
                                     "stream": False, "options": {"num_predict": 4}})
    assert r.status_code == 200 and r.json()["model"] == "smollm2:style"


def test_a_file_that_is_not_an_adapter_fails_the_load(model_path):
    settings = EngineSettings(n_ctx=256, parallel=1, threads=2,
                              loras=(LoraSpec("bad", model_path),))
    service = ModelService("smollm2", model_path, settings)
    with pytest.raises(RuntimeError, match="LoRA adapter 'bad'"):
        service.load(asyncio.new_event_loop())
    assert service.state == "failed" and "LoRA adapter 'bad'" in (service.error or "")
    if service.model is not None:
        service.model.close()


def test_a_missing_adapter_file_stops_the_server_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lmserve", "serve", "smollm2", "--lora",
                           f"gone={tmp_path / 'gone.gguf'}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "no such file" in done.stderr
