"""The oLLM dialect without a model: runtime checks, plan math, events and session bodies, turn
bookkeeping, and the routes over a service whose engine is the fake runner."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import FINISH_ERROR, FINISH_LENGTH, TokenOutput, Usage
from lmserve.dialects.ollm import adapter, encoder, plan
from lmserve.dialects.ollm.schema import GenerationIn, RuntimeIn
from lmserve.dialects.ollm.turns import Turns
from lmserve.engine import kv_layout
from lmserve.http.app import StoreSettings, create_app
from lmserve.models.gguf_header import read_header
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings
from tests.unit.fakes import FakeRunner
from tests.unit.dialects.ollama.test_ollama import make_ready

MIB = 1024 * 1024


# -- adapter ----------------------------------------------------------------------------------

def test_runtime_fields_that_match_this_server_pass():
    adapter.check_runtime(RuntimeIn())
    adapter.check_runtime(RuntimeIn(model_reference="m", backend="llama.cpp", device="CPU",
                                    use_cache=True, offload_gpu_layers=0, multimodal=False,
                                    stats=True, verbose=True, quiet=False, context_length=512))


@pytest.mark.parametrize("field, value", [
    ("backend", "transformers"), ("device", "cuda:0"), ("use_cache", False),
    ("offload_cpu_layers", 2), ("multimodal", True),
    ("use_specialization", True), ("force_download", True), ("models_dir", "/m"),
    ("adapter_dir", "/a"), ("cache_dir", "/c"), ("kv_cache_strategy", "paged"),
    ("kv_cache_window_tokens", 64), ("offload_cpu_policy", "auto"),
])
def test_runtime_fields_this_server_cannot_honour_are_refused(field, value):
    with pytest.raises(LmserveError) as exc:
        adapter.check_runtime(RuntimeIn(**{field: value}))
    assert exc.value.kind is ErrorKind.UNSUPPORTED and exc.value.param == f"runtime.{field}"


def test_a_prompt_must_match_the_served_runtime():
    running = {"context_length": 4096, "threads": 2, "threads_batch": 2, "parallel": 4}
    adapter.check_served(RuntimeIn(context_length=4096, parallel=4), running)
    with pytest.raises(LmserveError) as exc:
        adapter.check_served(RuntimeIn(context_length=8192), running)
    assert exc.value.param == "runtime.context_length" and "4096" in exc.value.message


def test_generation_settings_and_messages():
    merged = adapter.merge_generation({"temperature": 0.0, "max_new_tokens": 9},
                                      GenerationIn(max_new_tokens=3, stop=["\n", ""]))
    req = adapter.generation_request([], merged, "m")
    assert (req.max_tokens, req.stop, req.sampling.temperature, req.model) == (3, ["\n"], 0.0, "m")
    default = adapter.generation_request([], GenerationIn(), None)
    assert default.max_tokens == adapter.DEFAULT_MAX_NEW_TOKENS
    assert (default.sampling.temperature, default.sampling.top_k) == (1.0, 0)
    top = adapter.generation_request([], GenerationIn(top_k=5, top_p=0.5, seed=3), None)
    assert (top.sampling.top_k, top.sampling.top_p, top.sampling.seed) == (5, 0.5, 3)
    transcript = [{"role": "user", "content": "hi", "created_at": 1},
                  {"role": "assistant", "content": " Hello! ", "usage": {}}]
    messages = adapter.prompt_messages("Be brief.", transcript, "again")
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."), ("user", "hi"), ("assistant", " Hello! "), ("user", "again")]
    assert [m.role for m in adapter.prompt_messages(None, [], "x")] == ["user"]
    with pytest.raises(LmserveError):
        adapter.prompt_messages(None, [{"role": "tool", "content": 3}], "x")


# -- plan math --------------------------------------------------------------------------------

def smollm2() -> plan.ModelFacts:
    h = read_header(resolve("smollm2").path)
    return plan.facts_from_header(h.metadata, size_bytes=h.size_bytes, quantization=h.quantization)


def test_facts_from_the_smollm2_header():
    f = smollm2()
    assert (f.architecture, f.n_layer, f.n_head, f.n_head_kv) == ("llama", 30, 9, 3)
    assert (f.key_length, f.value_length, f.n_embd, f.n_vocab) == (64, 64, 576, 49152)
    assert (f.context_train, f.quantization, f.chat_template) == (8192, "Q4_1", True)
    assert f.kv_bytes_per_token == 30 * 3 * (64 + 64) * 2


def test_memory_matches_what_llama_cpp_allocates():
    """llama.cpp itself reports, for SmolLM2 at 4096 cells, n_ubatch 512 and 8 sequences:
    KV 90.00 MiB, CPU compute buffer 98.25 MiB, output buffer 1.50 MiB."""
    f = smollm2()
    knobs = plan.choose(f, {"n_ctx": 4096, "parallel": 4, "cache_slots": 4, "step_tokens": 512},
                        {}, cpu_count=2)
    mem = plan.memory(f, knobs, available=10 * 1024 * MIB)
    assert mem["kv_cache_bytes"] == 90 * MIB
    assert mem["compute_buffer_bytes"] == int(98.25 * MIB)
    assert mem["output_buffer_bytes"] == int(1.5 * MIB)
    assert mem["total_bytes"] == f.size_bytes + 90 * MIB + int(98.25 * MIB) + int(1.5 * MIB)
    assert mem["fits"] is True and plan.memory(f, knobs, available=MIB)["fits"] is False
    assert plan.memory(f, knobs, available=None)["fits"] is None


def test_split_streams_need_a_stream_per_slot():
    """llama.cpp reports, for SmolLM2 with kv_unified false, 8 sequences of 1024 cells:
    KV 180.00 MiB (1024 cells x 8 seqs)."""
    f = smollm2()
    knobs = plan.choose(f, {"n_ctx": 1024, "parallel": 4, "cache_slots": 4, "kv_layout": "split"},
                        {}, cpu_count=2)
    mem = plan.memory(f, knobs, available=None)
    assert knobs.n_seq_max == 8 and mem["kv_cache_bytes"] == 180 * MIB
    assert knobs.cache_tokens.value == 0  # no idle budget: idle streams cost others nothing
    body = plan.plan_body(plan.Target("smollm2", "smollm2", "bundled", "/m.gguf"), f, knobs, mem)
    assert body["runtime_config"]["kv_unified"] is False
    assert "8 x 1024 cells" in body["runtime_plan"]["details"]["kv_cache"]


def test_a_running_engine_reports_its_own_kv_layout():
    f = smollm2()
    fell_back = kv_layout.Layout(False, "one KV pool (auto: a stream per slot could not be made)")
    running = plan.choose(f, {"n_ctx": 1024}, {}, cpu_count=2, running_ctx=1024,
                          memory=64 * 1024 * MIB, running_layout=fell_back)
    assert not running.kv_split and "could not be made" in running.parallel.reason
    assert running.cache_tokens.value == 256  # the shared pool's idle budget
    # A plan asking for another context or parallelism is sized by the rule, not the engine.
    asked = plan.choose(f, {"n_ctx": 1024}, {"context_length": 2048}, cpu_count=2,
                        running_ctx=1024, memory=64 * 1024 * MIB, running_layout=fell_back)
    assert asked.kv_split and "auto" in asked.parallel.reason


def test_choices_say_where_they_came_from():
    f = smollm2()
    default = plan.choose(f, {}, {}, cpu_count=16)
    assert default.context.value == 4096 and "training context" in default.context.reason
    assert default.threads.value == 16 and "all 16 CPU cores" in default.threads.reason
    assert default.threads_batch.value == 16 and default.parallel.value == 8
    # a quarter as many cache slots as running ones; memory unknown, so one shared pool whose
    # idle budget is a quarter of the context
    assert (default.cache_slots.value, default.cache_tokens.value) == (2, 1024)
    assert (default.n_ubatch, default.n_seq_max) == (512, 10)
    flags = plan.choose(f, {"n_ctx": 2048, "threads": 3, "parallel": 2, "cache_slots": 1,
                            "cache_tokens": 100, "step_tokens": 64}, {}, cpu_count=16)
    assert (flags.context.value, flags.threads.value, flags.parallel.value) == (2048, 3, 2)
    assert "--ctx" in flags.context.reason and "--threads" in flags.threads.reason
    assert (flags.cache_slots.value, flags.cache_tokens.value, flags.n_ubatch) == (1, 100, 64)
    asked = plan.choose(f, {"n_ctx": 2048}, {"context_length": 16384, "parallel": 1},
                        cpu_count=4, running_ctx=4096)
    assert asked.context.value == 16384 and "beyond the training context" in asked.context.reason
    assert asked.parallel.reason.startswith("requested")
    running = plan.choose(f, {"n_ctx": None}, {}, cpu_count=4, running_ctx=4096)
    assert running.context.value == 4096 and "serving this model now" in running.context.reason


def test_context_defaults_cap_and_fallback_and_separate_kv_widths():
    long = plan.facts_from_header({"general.architecture": "q", "q.context_length": 131072},
                                  size_bytes=1, quantization=None)
    assert plan.choose(long, {}, {}, cpu_count=1).context.value == 4096
    none = plan.facts_from_header({"general.architecture": "q"}, size_bytes=1, quantization=None)
    assert plan.choose(none, {}, {}, cpu_count=1).context.value == 4096
    assert none.kv_bytes_per_token == 0
    gemma = plan.facts_from_header({
        "general.architecture": "gemma3", "gemma3.block_count": 18,
        "gemma3.embedding_length": 640, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256}, size_bytes=1, quantization=None)
    assert gemma.kv_bytes_per_token == 18 * 1 * 512 * 2


def test_plan_body_has_olllms_three_parts_and_reasons():
    f = smollm2()
    knobs = plan.choose(f, {"n_ctx": 4096, "parallel": 4}, {}, cpu_count=2)
    mem = plan.memory(f, knobs, available=None)
    target = plan.Target(reference="smollm2", name="smollm2", source="served", path="/m.gguf",
                         served_as="smollm2", loaded=True)
    body = plan.plan_body(target, f, knobs, mem)
    assert set(body) == {"runtime_config", "resolved_model", "runtime_plan"}
    assert body["runtime_config"]["context_length"] == 4096
    assert body["runtime_config"]["backend"] == "llama.cpp"
    assert body["resolved_model"]["served_as"] == "smollm2"
    details = body["runtime_plan"]["details"]
    assert {"backend", "context", "threads", "parallel", "offload", "weights", "kv_cache",
            "compute_buffer", "cache", "memory"} <= set(details)
    assert "90.0 MiB = 30 layers x 4096 cells" in details["kv_cache"]
    assert "could not be read" in details["memory"] and body["runtime_plan"]["offload"] == "none"
    assert all(isinstance(v, str) for v in details.values())


# -- encoder and turns ------------------------------------------------------------------------

def test_turn_metadata_usage_and_stored_messages():
    turn = encoder.Turn("m")
    assert turn.add(TokenOutput(index=0), 0.01) == "" and turn.first_token_s is None
    assert turn.add(TokenOutput(index=0, text="Hi", token_ids=[1]), 0.5) == "Hi"
    turn.add(TokenOutput(index=0, text="!", token_ids=[2], finish_reason=FINISH_LENGTH,
                         usage=Usage(10, 2, cached_tokens=7)), 0.9)
    body = turn.body(1.0, "sess_1")
    assert body["text"] == "Hi!" and body["session_id"] == "sess_1"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 7,
                             "total_tokens": 12}
    meta = body["metadata"]
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["finish_reason"], meta["cached_tokens"], meta["time_to_first_token_ms"]) == \
        ("length", "7", "500.0")
    user, assistant = turn.stored("hello", 5.0)
    assert user == {"role": "user", "content": "hello", "created_at": 5.0}
    assert assistant["content"] == "Hi!" and assistant["usage"]["cached_tokens"] == 7


def test_error_and_session_bodies():
    assert encoder.error_body(LmserveError(ErrorKind.NOT_FOUND, "gone")) == {"detail": "gone"}
    assert encoder.error_event(LmserveError(ErrorKind.INTERNAL, "x")) == ("error", {"detail": "x"})
    session = SimpleNamespace(id="s", model="m", system=None, message_count=1, created_at=1.0,
                              updated_at=2.0, metadata={"session_name": "n"},
                              messages=[{"role": "user", "content": "hi", "created_at": 1.0}])
    body = encoder.session_body(session)
    assert (body["session_id"], body["session_name"], body["system_prompt"]) == ("s", "n", "")
    assert body["messages"] == [{"role": "user", "created_at": 1.0,
                                 "content": [{"type": "text", "value": "hi"}]}]


def test_one_turn_at_a_time_per_session():
    turns = Turns()
    first = turns.claim("s")
    with pytest.raises(LmserveError) as exc:
        turns.claim("s")
    assert exc.value.kind is ErrorKind.OVERLOADED and exc.value.code == "session_busy"
    turns.claim("other")
    generation = SimpleNamespace(finished=False)
    first.generation = generation  # type: ignore[assignment]
    with pytest.raises(LmserveError):
        turns.claim("s")
    generation.finished = True  # a stream that never started is stale once the backend is done
    second = turns.claim("s")
    second.owned = True
    with pytest.raises(LmserveError):
        turns.claim("s")
    turns.release("s", first)  # releasing a stale claim leaves the newer one in place
    with pytest.raises(LmserveError):
        turns.claim("s")
    turns.release("s", second)
    turns.claim("s")


# -- HTTP over the fake engine ----------------------------------------------------------------

@contextlib.contextmanager
def client(runner: FakeRunner | None = None) -> Iterator[TestClient]:
    registry = ModelRegistry()
    service = registry.add("tiny", resolve("smollm2").path, EngineSettings(parallel=2))
    with TestClient(create_app(registry, load_on_startup=False,
                               store=StoreSettings(url="memory"))) as test_client:
        if runner is not None:
            test_client.portal.call(make_ready, service, runner)  # type: ignore[union-attr]
        yield test_client


def events(response) -> list[tuple[str, Any]]:  # type: ignore[no-untyped-def]
    assert response.headers["content-type"].startswith("text/event-stream")
    out, name = [], None
    for line in response.text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


GEN = {"max_new_tokens": 3, "temperature": 0}


def test_health_models_plan_and_errors():
    with client() as c:
        r = c.get("/v1/health")
        assert r.status_code == 503 and r.json()["ok"] is False and r.json()["service"] == "lmserve"
        models = c.get("/v1/ollm/models").json()["models"]
        assert models[0]["normalized_name"] == "tiny" and models[0]["runtime"]["loaded"] is False
        assert all(m["materialized"] for m in c.get("/v1/ollm/models?installed=true")
                   .json()["models"])
        assert c.get("/v1/ollm/models/tiny").json()["runtime"]["quantization"] == "Q4_1"
        bundled = c.get("/v1/ollm/models/smollm2").json()  # the served file, by bundled name
        assert bundled["runtime"]["served_as"] == "tiny"
        r = c.get("/v1/ollm/models/nope")
        assert r.status_code == 404 and list(r.json()) == ["detail", "request_id"]
        p = c.post("/v1/plan", json={"runtime": {"model_reference": "smollm2",
                                                 "context_length": 1024}}).json()
        assert p["runtime_config"]["context_length"] == 1024 and p["runtime_config"]["parallel"] == 2
        # auto layout: 2 + 1 slots x 1024 cells (68 MiB) fit in an eighth of any test machine
        assert p["runtime_config"]["kv_unified"] is False
        assert p["runtime_plan"]["memory"]["kv_cache_bytes"] == 3 * 1024 * 23040
        assert "auto" in p["runtime_plan"]["details"]["parallel"]
        r = c.post("/v1/plan", json={"runtime": {"model_reference": "/no/such.gguf"}})
        assert r.status_code == 404 and "no model" in r.json()["detail"]
        r = c.post("/v1/plan", json={"runtime": {"model_reference": "hf://a/b/c.gguf"}})
        assert r.status_code == 400 and "never download" in r.json()["detail"]
        r = c.post("/v1/plan", json={"runtime": {"device": "cuda"}})
        assert r.status_code == 400 and "runtime.device" in r.json()["detail"]
        r = c.post("/v1/plan", json={"runtime": {"colour": "red"}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "runtime",
                                                                         "colour"]
        r = c.post("/v1/prompt", json={"prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["detail"]


def test_prompt_and_stream():
    with client(FakeRunner(n_ctx=512)) as c:
        whole = c.post("/v1/prompt", json={"prompt": "hi", "generation": GEN}).json()
        assert whole["usage"]["completion_tokens"] == 3 and whole["text"]
        assert whole["metadata"]["finish_reason"] == "length"
        got = events(c.post("/v1/prompt/stream", json={"prompt": "hi", "generation": GEN}))
        assert got[0][0] == "status" and got[-1][0] == "complete"
        assert "".join(d["delta"] for n, d in got if n == "text") == got[-1][1]["text"] == \
            whole["text"]
        quiet = events(c.post("/v1/prompt/stream", json={"prompt": "hi", "generation": GEN,
                                                         "runtime": {"quiet": True}}))
        assert quiet[0][0] == "text"
        r = c.post("/v1/prompt", json={"prompt": "hi", "runtime": {"context_length": 99}})
        assert r.status_code == 400 and "runtime.context_length" in r.json()["detail"]
        r = c.post("/v1/prompt", json={"prompt": "hi", "runtime": {"model_reference": "x"}})
        assert r.status_code == 404
        r = c.post("/v1/prompt", json={"prompt": "x" * 600})
        assert r.status_code == 400 and "context length" in r.json()["detail"]


def test_session_lifecycle_reuses_the_prefix():
    with client(FakeRunner(n_ctx=1024)) as c:
        created = c.post("/v1/sessions", json={"system_prompt": "Be brief.", "generation": GEN,
                                               "session_name": "demo"}).json()
        sid = created["session_id"]
        assert (created["session_name"], created["model_reference"]) == ("demo", "tiny")
        assert created["messages"] == [] and created["generation"] == {
            "max_new_tokens": 3, "temperature": 0.0}
        first = c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "one"}).json()
        got = events(c.post(f"/v1/sessions/{sid}/prompt/stream",
                            json={"prompt": "two", "generation": {"max_new_tokens": 2}}))
        second = got[-1][1]
        assert got[-1][0] == "complete" and second["usage"]["completion_tokens"] == 2
        assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
        transcript = c.get(f"/v1/sessions/{sid}").json()
        assert [(m["role"], m["content"][0]["value"]) for m in transcript["messages"]] == [
            ("user", "one"), ("assistant", first["text"]), ("user", "two"),
            ("assistant", second["text"])]
        assert transcript["message_count"] == 4
        assert c.delete(f"/v1/sessions/{sid}").json() == {"session_id": sid, "deleted": True}
        for r in (c.get(f"/v1/sessions/{sid}"), c.delete(f"/v1/sessions/{sid}"),
                  c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "x"})):
            assert r.status_code == 404 and "not found" in r.json()["detail"]
        r = c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "x", "extra": 1})
        assert r.status_code == 422


def test_a_failed_turn_is_not_stored():
    with client(FakeRunner(n_ctx=1024, kv_capacity=70)) as c:
        sid = c.post("/v1/sessions", json={"generation": GEN}).json()["session_id"]
        r = c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "x" * 80})
        # a full KV cache is the engine's capacity, not a fault: 503, and worth a retry
        assert r.status_code == 503 and "is full" in r.json()["detail"]
        got = events(c.post(f"/v1/sessions/{sid}/prompt/stream", json={"prompt": "x" * 80}))
        assert got[-1][0] == "error"
        assert c.get(f"/v1/sessions/{sid}").json()["messages"] == []
        assert c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "ok"}).status_code == 200


def test_failed_generation_detail_is_named():
    turn = encoder.Turn("m")
    turn.add(TokenOutput(index=0, finish_reason=FINISH_ERROR, error="kv full"), 0.1)
    assert turn.finish_reason == FINISH_ERROR and turn.error == "kv full"
