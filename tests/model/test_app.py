"""Apps built in code: the seed's example, resources, dialect prefixes, shared engines."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.model.conftest import Server, free_port, stop_server, wait_ready
from tests.model.sse import read_sse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_app(tmp: str, reference: str, **env: str) -> Server:
    port = free_port()
    log_path = os.path.join(tmp, f"app-{port}.log")
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "run", reference, "--port", str(port)],
                            cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **env})
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    wait_ready(server)
    return server


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = run_app(str(tmp_path_factory.mktemp("example")), "examples.serving_llms:app",
                  LMSERVE_STORE="memory")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = run_app(str(tmp_path_factory.mktemp("coded")), "tests.model.native_app:app")
    yield srv
    stop_server(srv)


def test_example_serves_native_and_openai_under_the_resource(example):
    with httpx.Client(base_url=example.url, timeout=120) as http:
        info = http.get("/llm/").json()
        assert info["name"] == "assistant" and info["serving"] == ["native", "openai"]
        assert info["params"]["temperature"] == 0.7 and info["params"]["max_tokens"] == 512
        out = http.post("/llm/query/", json={"transport": "chat", "prompt": "Hi",
                                             "system": "Be brief.",
                                             "params": {"max_tokens": 4}}).json()
        assert out["blocks"][0]["channel"] == "output" and out["usage"]["output_tokens"] <= 4
        # Dialects the resource does not serve are not mounted.
        assert http.post("/llm/anthropic/v1/messages", json={}).status_code == 404
        schema = http.get("/openapi.json").json()
        assert schema["info"]["title"] == "Generative AI API"
        tags = {t for op in schema["paths"]["/llm/query/"].values() for t in op.get("tags", [])}
        assert tags == {"assistant"}
        assert "/llm/openai/v1/chat/completions" in schema["paths"]
        assert http.get("/docs/").status_code == 200
    with openai.OpenAI(base_url=f"{example.url}/llm/openai/v1", api_key="x",
                       max_retries=0) as client:
        reply = client.chat.completions.create(model="assistant", max_tokens=3,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens <= 3
        assert [m.id for m in client.models.list()] == ["assistant"]


def test_resource_defaults_apply_to_every_dialect_and_put_changes_them(coded):
    with openai.OpenAI(base_url=f"{coded.url}/llm/openai/v1", api_key="x", max_retries=0) as c:
        reply = c.chat.completions.create(model="any-name-works-here",
                                          messages=[{"role": "user", "content": "Tell a story"}])
        assert reply.usage.completion_tokens == 5  # the resource's max_tokens default
    with httpx.Client(base_url=coded.url, timeout=120) as http:
        assert http.put("/llm/", json={"params": {"temperature": 0, "max_tokens": 2}}).json() == \
            {"params": {"temperature": 0, "max_tokens": 2, "reasoning": False}}
        out = http.post("/llm/query/", json={"prompt": "Tell a story"}).json()
        assert out["usage"]["output_tokens"] == 2
        r = http.post("/llm/ollama/api/generate", json={"model": "assistant", "prompt": "Hi",
                                                        "stream": False,
                                                        "options": {"num_predict": 3}})
        assert r.status_code == 200 and r.json()["eval_count"] == 3
        r = http.post("/llm/ollama/api/generate", json={"model": "assistant",
                                                        "prompt": "Tell a story", "stream": False})
        assert r.status_code == 200 and r.json()["eval_count"] == 2  # the PUT default
        bad = http.put("/llm/", json={"params": {"temp": 1}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "params.temp"


def test_same_gguf_twice_shares_one_engine(coded):
    health = httpx.get(f"{coded.url}/health").json()
    assert list(health["models"]) == ["assistant"]  # one loaded service, two resources
    with httpx.Client(base_url=coded.url, timeout=120) as http:
        assert http.get("/beat/").json()["verbose_name"] == "Heartbeat probe"
        assert http.post("/beat/openai/v1/chat/completions", json={}).status_code == 404
    with anthropic.Anthropic(base_url=f"{coded.url}/beat/anthropic", api_key="x",
                             max_retries=0) as claude:
        msg = claude.messages.create(model="beat", max_tokens=3,
                                     messages=[{"role": "user", "content": "Hi"}])
        assert msg.usage.output_tokens <= 3


def test_idle_streams_get_heartbeat_comments(coded):
    with httpx.Client(base_url=coded.url, timeout=120) as http:
        # A long prompt keeps the stream silent while it is processed.
        r = http.post("/beat/stream/", json={"transport": "raw", "prompt": "lorem ipsum " * 500,
                                             "params": {"max_tokens": 2}})
        assert r.status_code == 201
        frames, heartbeats = read_sse(http, f"/beat/stream/{r.json()['id']}/")
        assert frames[-1].event == "message.stop"
        assert heartbeats >= 1
