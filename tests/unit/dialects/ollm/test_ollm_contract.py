"""The oLLM dialect over the backend contract: a choice that fails keeps its ErrorKind, so a
full KV cache (CAPACITY) is a 503 {"detail"} before the first byte and an `error` event after
it, and a failed session turn is not stored; health, discovery and plans read the card; the
dialect imports nothing of the engine but the pure KV layout rule its plans size with."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from lmserve.core.errors import ErrorKind
from lmserve.dialects.ollm import plan, routes
from lmserve.http.app import StoreSettings, create_app
from lmserve.models.gguf_header import read_header
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from tests.unit.chat_service import ScriptedService, imports, script
from tests.unit.dialects.ollm.test_ollm import events
from tests.unit.dialects.sglang.test_sglang_contract import FAILURE_STATUS, FULL, failing, scripted

MIB = 1024 * 1024


def bare(body: dict) -> dict:
    """An error body without the request id every error body carries."""
    return {k: v for k, v in body.items() if k != "request_id"}


@contextlib.contextmanager
def client_for(service: ScriptedService) -> Iterator[TestClient]:
    registry = ModelRegistry()
    registry.add_backend(service)
    with TestClient(create_app(registry, load_on_startup=False,
                               store=StoreSettings(url="memory"))) as client:
        yield client


@pytest.mark.parametrize("kind, status", FAILURE_STATUS)
def test_a_failed_choice_before_the_first_byte_has_its_kinds_status(kind, status):
    service = scripted(failing(kind, "it went wrong"))
    with client_for(service) as c:
        r = c.post("/v1/prompt", json={"prompt": "hi"})
    assert r.status_code == status and bare(r.json()) == {"detail": "it went wrong"}
    assert service.started[0][2].closed


def test_a_full_kv_cache_after_the_first_byte_is_an_error_event():
    service = scripted(failing(ErrorKind.CAPACITY))
    with client_for(service) as c:
        r = c.post("/v1/prompt/stream", json={"prompt": "hi"})
    assert r.status_code == 200
    got = events(r)
    assert [name for name, _ in got] == ["status", "text", "text", "error"]
    assert [d["delta"] for n, d in got if n == "text"] == ["Hel", "lo"]
    assert bare(got[-1][1]) == {"detail": FULL}
    assert service.started[0][2].closed


def test_a_failed_session_turn_is_not_stored():
    service = scripted(failing(ErrorKind.CAPACITY))
    with client_for(service) as c:
        sid = c.post("/v1/sessions", json={}).json()["session_id"]
        r = c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "one"})
        assert r.status_code == 503 and bare(r.json()) == {"detail": FULL}
        got = events(c.post(f"/v1/sessions/{sid}/prompt/stream", json={"prompt": "two"}))
        assert (got[-1][0], bare(got[-1][1])) == ("error", {"detail": FULL})
        assert c.get(f"/v1/sessions/{sid}").json()["messages"] == []
        service.steps = script(["Hi"])
        ok = c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "three"})
        assert ok.status_code == 200 and ok.json()["text"] == "Hi"


def test_prompts_read_the_raw_text_unparsed():
    service = scripted(script(["<think>a</think>", "b"]))
    with client_for(service) as c:
        assert c.post("/v1/prompt", json={"prompt": "hi"}).json()["text"] == \
            "<think>a</think>b"


def test_health_discovery_and_served_runtime_read_the_card():
    with client_for(scripted(script(["x"]))) as c:
        health = c.get("/v1/health").json()
        assert health["models"] == {"m": {"state": "ready", "error": None}}
        served = c.get("/v1/ollm/models/m").json()
        runtime = served["runtime"]
        assert (runtime["state"], runtime["loaded"], runtime["context_length"]) == \
            ("ready", True, 4096)
        assert (runtime["parallel"], runtime["parameters"]) == (4, 1234)
        assert served["path"] == "/nonexistent.gguf" and not served["materialized"]
        r = c.post("/v1/prompt", json={"prompt": "hi", "runtime": {"parallel": 3}})
        assert r.status_code == 400 and "parallel=4" in r.json()["detail"]
        r = c.post("/v1/prompt", json={"prompt": "hi", "runtime": {"context_length": 4096,
                                                                    "parallel": 4}})
        assert r.status_code == 200


def test_a_plan_for_the_served_model_takes_the_cards_layout():
    h = read_header(resolve("smollm2").path)
    facts = plan.facts_from_header(h.metadata, size_bytes=h.size_bytes,
                                   quantization=h.quantization)
    memory = 64 * 1024 * MIB  # the rule splits 1024-cell streams here
    rule = plan.choose(facts, {"n_ctx": 1024}, {}, cpu_count=2, memory=memory)
    agreed = plan.choose(facts, {"n_ctx": 1024}, {}, cpu_count=2, running_ctx=1024,
                         memory=memory, running_layout="split")
    assert agreed.kv_split and agreed.parallel.reason == rule.parallel.reason
    fell_back = plan.choose(facts, {"n_ctx": 1024}, {}, cpu_count=2, running_ctx=1024,
                            memory=memory, running_layout="shared")
    assert not fell_back.kv_split and "could not be made" in fell_back.parallel.reason
    assert fell_back.cache_tokens.value == 256  # the shared pool's idle budget
    asked = plan.choose(facts, {"n_ctx": 1024}, {"parallel": 2}, cpu_count=2,
                        running_ctx=1024, memory=memory, running_layout="shared")
    assert asked.kv_split  # another parallelism: sized by the rule, not the engine


def test_the_dialect_imports_only_the_contract():
    """Routes encode: no ModelService and, of the engine, only plan.py's pure KV layout rule.
    GGUF headers are read for discovery and plans (the card has no layer or head counts)."""
    for file, module in imports(pathlib.Path(routes.__file__).parent):
        assert not module.startswith("lmserve.service"), (file, module)
        if module.startswith("lmserve.engine"):
            assert file == "plan.py" and module in ("lmserve.engine",
                                                    "lmserve.engine.kv_layout",
                                                    "lmserve.engine.hardware"), (file, module)
