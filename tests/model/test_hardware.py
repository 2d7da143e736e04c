"""Where the model runs: KV cache types (measurable on the CPU) and GPU offload (a `gpu` test,
skipped without a GPU build). The card, /api/ps and /v1/plan say where the weights and KV live."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.model.conftest import Server, own_server

# SmolLM2: 30 layers x 3 KV heads x (64 + 64) elements a cell; q8_0 stores 34 bytes per 32.
Q8_CELL = 30 * 3 * 128 * 34 // 32
SLOTS = 3  # --parallel 2 + 1 cache slot (a quarter, at least 1), a stream each (auto splits)


@pytest.fixture(scope="module")
def q8_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "q8", "smollm2", "--parallel", "2", "--ctx", "1024",
                          "--threads", "2", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0",
                          "--store", "memory")


def test_a_q8_0_kv_cache_answers_and_is_reported_everywhere(q8_server):
    reply = httpx.post(f"{q8_server.base_url}/chat/completions", timeout=120, json={
        "model": "smollm2", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a fruit."}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].strip()
    meta = httpx.get(f"{q8_server.base_url}/models/smollm2", timeout=10).json()["meta"]
    place = meta["placement"]
    assert (place["cache_type_k"], place["cache_type_v"], place["kv_where"]) == \
        ("q8_0", "q8_0", "cpu")
    assert place["kv_bytes"] == Q8_CELL * 1024 * SLOTS and meta["kv_layout"] == "split"
    assert (place["where"], place["gpu_layers"], place["n_layer"]) == ("cpu", 0, 30)
    ps = httpx.get(f"{q8_server.url}/api/ps", timeout=10).json()["models"][0]
    assert ps["size"] == meta["size"] + place["kv_bytes"] and ps["size_vram"] == 0
    plan = httpx.post(f"{q8_server.url}/v1/plan", timeout=30,
                      json={"runtime": {"model_reference": "smollm2"}}).json()
    memory = plan["runtime_plan"]["memory"]
    assert (memory["kv_cache_type"], memory["kv_bytes_per_token"], memory["kv_cache_bytes"]) == \
        ("q8_0", Q8_CELL, place["kv_bytes"])
    assert plan["runtime_config"]["cache_type_v"] == "q8_0"
    assert plan["runtime_config"]["device"] == "cpu" and memory["gpu_layers"] == 0


def test_a_combination_llama_cpp_cannot_run_is_refused_at_start(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lmserve", "serve", "smollm2", "--port", "9",
                          "--cache-type-v", "q8_0", "--flash-attn", "off"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "cache_type_v q8_0 needs flash attention" in run.stderr


@pytest.mark.gpu
def test_all_layers_offloaded_answer_and_say_so(tmp_path_factory):
    for server in own_server(tmp_path_factory, "gpu", "smollm2", "--parallel", "2", "--ctx",
                             "1024", "--gpu-layers", "all", "--store", "memory"):
        reply = httpx.post(f"{server.base_url}/chat/completions", timeout=120, json={
            "model": "smollm2", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a fruit."}]})
        assert reply.status_code == 200
        place = httpx.get(f"{server.base_url}/models/smollm2", timeout=10).json()["meta"][
            "placement"]
        assert (place["where"], place["gpu_layers"], place["kv_where"]) == ("gpu", 31, "gpu")
        ps = httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"][0]
        assert ps["size_vram"] == ps["size"]
