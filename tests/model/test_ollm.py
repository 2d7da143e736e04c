"""The oLLM-style local API against the real server and model: discovery, plans, prompts and
sessions whose second turn reuses the first turn's KV."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

GREEDY = {"temperature": 0, "max_new_tokens": 8}
COLOURS = ("red", "blue", "green", "amber", "white", "violet")
# About 1000 tokens, so the first turn's prefill is long enough to see what reuse saves.
HARBOUR = "You answer questions about the harbour's lanterns. " + " ".join(
    f"Lantern {i} stands on pier {i % 7} and is painted {COLOURS[i % 6]}." for i in range(60))


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def stream_prompt(http: httpx.Client, path: str, body: dict[str, Any]
                  ) -> tuple[list[tuple[str, Any]], float | None]:
    """The events of a streamed prompt and the client-side time to the first text event."""
    events: list[tuple[str, Any]] = []
    first_text: float | None = None
    start = time.perf_counter()
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        name = "message"
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                if name == "text" and first_text is None:
                    first_text = time.perf_counter() - start
                events.append((name, json.loads(line[6:])))
    return events, first_text


def test_health_and_discovery(http):
    health = http.get("/v1/health").json()
    assert health["ok"] is True and health["server_mode"] == "local-only"
    models = http.get("/v1/ollm/models").json()["models"]
    served = next(m for m in models if m["discovery_source"] == "served")
    runtime = served["runtime"]
    assert served["normalized_name"] == "smollm2" and served["materialized"]
    assert runtime["loaded"] and runtime["context_length"] == 4096 and runtime["parallel"] == 4
    assert runtime["quantization"] == "Q4_1" and runtime["parameters"] > 100_000_000
    assert runtime["size_bytes"] > 0 and served["path"].endswith(".gguf")
    by_path = http.get(f"/v1/ollm/models/{served['path']}").json()
    assert by_path["runtime"]["served_as"] == "smollm2"
    missing = http.get("/v1/ollm/models/no-such-model")
    assert missing.status_code == 404 and "no-such-model" in missing.json()["detail"]


def test_plan_for_the_served_model_and_others(http):
    p = http.post("/v1/plan", json={"runtime": {"model_reference": "smollm2"}}).json()
    config, memory = p["runtime_config"], p["runtime_plan"]["memory"]
    assert (config["context_length"], config["parallel"], config["threads"]) == (4096, 4, 2)
    assert config["backend"] == "llama.cpp" and p["runtime_plan"]["offload"] == "none"
    assert p["resolved_model"]["loaded"] and p["resolved_model"]["n_layer"] == 30
    assert config["kv_unified"] is False  # auto: 4 + 1 slots x 4096 cells fit in 1/8 of memory
    assert memory["kv_cache_bytes"] == 5 * 4096 * 30 * 3 * 128 * 2
    assert memory["total_bytes"] > memory["weights_bytes"] + memory["kv_cache_bytes"]
    assert memory["available_bytes"] > 0 and isinstance(memory["fits"], bool)
    assert "serving this model now" in p["runtime_plan"]["details"]["context"]
    bigger = http.post("/v1/plan", json={"runtime": {"model_reference": p["resolved_model"]
                                                     ["path"], "context_length": 8192}}).json()
    assert bigger["runtime_plan"]["memory"]["kv_cache_bytes"] == 2 * memory["kv_cache_bytes"]
    assert bigger["runtime_plan"]["details"]["context"].startswith("8192 tokens: requested")
    bad = http.post("/v1/plan", json={"runtime": {"model_reference": "/nowhere/x.gguf"}})
    assert bad.status_code == 404 and "no model" in bad.json()["detail"]
    gpu = http.post("/v1/plan", json={"runtime": {"model_reference": "smollm2",
                                                  "offload_gpu_layers": 10}}).json()
    # A plan may ask for GPU layers; this CPU-only build says it would offload none, and why.
    assert gpu["runtime_config"]["offload_gpu_layers"] == 0 and gpu["runtime_config"][
        "device"] == "cpu"
    assert gpu["runtime_plan"]["details"]["offload"].startswith(
        "cpu: CPU only: this llama.cpp build has no GPU backend (--gpu-layers 10 asked")
    typo = http.post("/v1/plan", json={"runtime": {"model_ref": "smollm2"}})
    assert typo.status_code == 422 and typo.json()["detail"][0]["loc"][-1] == "model_ref"


def test_prompt_and_prompt_stream(http):
    body = {"prompt": "Name a colour.", "system_prompt": "Answer in one word.",
            "generation": GREEDY}
    whole = http.post("/v1/prompt", json=body).json()
    assert whole["text"] and whole["metadata"]["backend"] == "llama.cpp"
    assert whole["usage"]["completion_tokens"] <= 8 and whole["metadata"]["model_reference"] == \
        "smollm2"
    events, _ = stream_prompt(http, "/v1/prompt/stream", body)
    names = [n for n, _ in events]
    assert names[0] == "status" and names[-1] == "complete" and set(names[1:-1]) == {"text"}
    assert "".join(d["delta"] for n, d in events if n == "text") == events[-1][1]["text"] == \
        whole["text"]
    r = http.post("/v1/prompt", json={"prompt": "x", "generation": {"temprature": 1}})
    assert r.status_code == 422


def test_session_turns_reuse_the_warm_prefix(http):
    created = http.post("/v1/sessions", json={"system_prompt": HARBOUR, "generation": GREEDY,
                                              "session_name": "harbour"}).json()
    sid = created["session_id"]
    path = f"/v1/sessions/{sid}/prompt/stream"
    first_events, ttft_1 = stream_prompt(http, path, {"prompt": "Which lantern is red?"})
    second_events, ttft_2 = stream_prompt(http, path, {"prompt": "And which one is blue?"})
    first, second = first_events[-1][1], second_events[-1][1]
    assert first_events[-1][0] == second_events[-1][0] == "complete"
    u1, u2 = first["usage"], second["usage"]
    ideal = u1["prompt_tokens"] + u1["completion_tokens"] - 1  # all but the unsampled last
    print(f"\nsession turn 1: {u1['prompt_tokens']} prompt tokens, {u1['cached_tokens']} cached,"
          f" time to first token {ttft_1 * 1000:.0f} ms (server: "
          f"{first['metadata']['time_to_first_token_ms']} ms)"
          f"\nsession turn 2: {u2['prompt_tokens']} prompt tokens, {u2['cached_tokens']} cached "
          f"(ideal {ideal}), time to first token {ttft_2 * 1000:.0f} ms (server: "
          f"{second['metadata']['time_to_first_token_ms']} ms)")
    assert u1["prompt_tokens"] > 900
    assert u2["cached_tokens"] >= u1["prompt_tokens"]  # turn 2 prefilled only its new tokens
    transcript = http.get(f"/v1/sessions/{sid}").json()
    assert transcript["session_name"] == "harbour" and transcript["system_prompt"] == HARBOUR
    assert [(m["role"], m["content"][0]["value"]) for m in transcript["messages"]] == [
        ("user", "Which lantern is red?"), ("assistant", first["text"]),
        ("user", "And which one is blue?"), ("assistant", second["text"])]


def test_session_lifecycle_busy_and_delete(http):
    sid = http.post("/v1/sessions", json={"generation": GREEDY}).json()["session_id"]
    assert http.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "Hi."}).status_code == 200
    with http.stream("POST", f"/v1/sessions/{sid}/prompt/stream",
                     json={"prompt": "Tell me more.", "generation": {"max_new_tokens": 6}}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line == "event: text":
                busy = http.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "Too soon."})
                assert busy.status_code == 429 and "still answering" in busy.json()["detail"]
                break
        assert any(line == "event: complete" for line in lines)
    # The complete event goes out only once the turn is stored.
    assert http.get(f"/v1/sessions/{sid}").json()["message_count"] == 4
    assert http.delete(f"/v1/sessions/{sid}").json() == {"session_id": sid, "deleted": True}
    for r in (http.get(f"/v1/sessions/{sid}"),
              http.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "x"}),
              http.delete(f"/v1/sessions/{sid}")):
        assert r.status_code == 404 and set(r.json()) == {"detail", "request_id"}
    unknown = http.post("/v1/sessions", json={"runtime": {"model_reference": "other"}})
    assert unknown.status_code == 404 and "not served" in unknown.json()["detail"]
