"""lmserve in front of another OpenAI-compatible server (`--upstream NAME=URL`): the shared
`server` (SmolLM2) is the upstream of a front with no model of its own, and every dialect of
the front serves it. Also: an upstream that is down, an upstream's 400, a client that leaves
mid-stream, parameters an upstream cannot carry, and llama-server as the upstream."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.model.conftest import (
    Server,
    free_port,
    own_server,
    start_server,
    stop_server,
    wait_ready,
)
from tests.model.sse import read_sse
from tests.model.upstream_fixtures import llama_server_binary

MSG = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"max_tokens": 16, "temperature": 0}
P = "/models/smollm2/"


@pytest.fixture()
def front(upstream_front: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream_front.url, timeout=120) as c:
        yield c


@pytest.fixture()
def local(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def chat(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG,
                                                   **GREEDY, **body})


def sse_data(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# -- every dialect over the upstream ----------------------------------------------------------

def test_openai_chat_through_the_front_is_the_upstream_s_answer(front, local):
    mine, theirs = chat(front), chat(local)
    assert mine.status_code == 200, mine.text
    a, b = mine.json(), theirs.json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] > 5
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    streamed = chat(front, stream=True, stream_options={"include_usage": True})
    chunks = sse_data(streamed.text)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c.get("choices"))
    assert text == a["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]


def test_openai_completions_through_the_front(front, local):
    body = {"model": "smollm2", "prompt": "The capital of France is", **GREEDY}
    mine = front.post("/v1/completions", json=body)
    assert mine.status_code == 200, mine.text
    assert mine.json()["choices"][0]["text"] == \
        local.post("/v1/completions", json=body).json()["choices"][0]["text"]


def test_anthropic_messages_through_the_front(upstream_front):
    with anthropic.Anthropic(base_url=upstream_front.url, api_key="unused", max_retries=0,
                             timeout=120) as claude:
        kw = dict(model="smollm2", max_tokens=12, messages=MSG,
                  extra_body={"temperature": 0})
        r = claude.messages.create(**kw)
        assert r.content[0].text.strip() and r.stop_reason in ("end_turn", "max_tokens")
        assert r.usage.output_tokens > 0
        with claude.messages.stream(**kw) as stream:
            assert "".join(stream.text_stream) == r.content[0].text


def test_ollama_chat_through_the_front(front):
    body = {"model": "smollm2", "messages": MSG, "options": {"temperature": 0,
                                                            "num_predict": 8}}
    whole = front.post("/api/chat", json={**body, "stream": False})
    assert whole.status_code == 200, whole.text
    assert whole.json()["done"] and whole.json()["eval_count"] > 0
    lines = [json.loads(line) for line in front.post("/api/chat", json=body).text.splitlines()]
    assert "".join(part["message"]["content"] for part in lines) == \
        whole.json()["message"]["content"]
    assert lines[-1]["done"] is True


def test_native_stream_and_query_through_the_front(front):
    body = {"prompt": "Name a color.", "params": {"max_tokens": 8, "temperature": 0}}
    query = front.post(f"{P}query/", json=body)
    assert query.status_code == 200, query.text
    started = front.post(f"{P}stream/", json=body)
    assert started.status_code == 201, started.text
    frames, _ = read_sse(front, f"{P}stream/{started.json()['id']}/")
    text = "".join(f.data["text"] for f in frames if f.event == "block.delta")
    assert text == query.json()["blocks"][0]["text"]
    assert frames[-1].event == "message.stop"


def test_responses_chain_with_previous_response_id_through_the_front(upstream_front):
    with openai.OpenAI(base_url=upstream_front.base_url, api_key="unused", max_retries=0,
                       timeout=120) as client:
        kw = dict(model="smollm2", max_output_tokens=16, temperature=0)
        r1 = client.responses.create(input="My name is Ada.", **kw)
        r2 = client.responses.create(input="What is my name?", previous_response_id=r1.id, **kw)
        assert r2.previous_response_id == r1.id and r2.output_text
        assert r2.usage.input_tokens > r1.usage.input_tokens  # the first turn went along


def test_sglang_generate_text_through_the_front(front, local):
    body = {"text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    mine = front.post("/generate", json=body)
    assert mine.status_code == 200, mine.text
    assert mine.json()["text"] == local.post("/generate", json=body).json()["text"]


def test_ollm_session_through_the_front(front):
    sid = front.post("/v1/sessions", json={"generation": {"temperature": 0,
                                                          "max_new_tokens": 8}}
                     ).json()["session_id"]
    for prompt in ("My name is Ada.", "What is my name?"):
        r = front.post(f"/v1/sessions/{sid}/prompt", json={"prompt": prompt})
        assert r.status_code == 200, r.text
    assert front.get(f"/v1/sessions/{sid}").json()["message_count"] == 4


def test_the_front_lists_the_upstream_model_with_its_context(front):
    models = front.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["smollm2"]
    health = front.get("/health").json()
    assert health["status"] == "ok" and health["models"]["smollm2"]["state"] == "ready"
    assert front.get("/metrics").status_code == 200


# -- errors -----------------------------------------------------------------------------------

def test_an_upstream_400_passes_through_with_its_message(front, upstream_front):
    for stream in (False, True):  # a streamed request is refused before its first byte
        r = chat(front, max_tokens=100_000, stream=stream)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        assert "maximum context length is 4096" in error["message"]
    long = [{"role": "user", "content": "word " * 5000}]
    r = front.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                   json={"model": "smollm2", "max_tokens": 4, "messages": long})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    # Ollama's window is checked by the front, which counts the prompt through the upstream's
    # /tokenize: refused before anything is generated, with Ollama's own wording.
    r = front.post("/api/chat", json={"model": "smollm2", "messages": long, "stream": False})
    assert r.status_code == 400, r.text
    assert "does not fit the context window of 4096 tokens (the model's context)" in \
        r.json()["error"], r.text


def test_parameters_an_upstream_cannot_carry_are_a_400_naming_them(front):
    r = chat(front, lora="style")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
    r = front.post(f"{P}query/", json={"prompt": "x", "format": {"type": "gbnf",
                                                                 "grammar": 'root ::= "a"'}})
    assert r.status_code == 400 and "gbnf" in r.text, r.text
    r = front.post("/generate", json={"text": "x", "sampling_params": {"regex": "a+"}})
    assert r.status_code == 400 and "regex" in r.text, r.text
    r = front.post(f"{P}query/", json={"prompt": "x", "format": {"type": "regex",
                                                                 "pattern": "a+"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format.pattern", r.text


def test_a_client_that_leaves_mid_stream_aborts_the_upstream_request(upstream_front, server):
    with openai.OpenAI(base_url=upstream_front.base_url, api_key="unused", max_retries=0,
                       timeout=120) as client:
        stream = client.chat.completions.create(
            model="smollm2", messages=MSG, max_tokens=3000, stream=True,
            extra_body={"ignore_eos": True})
        for got, _ in enumerate(stream):
            if got == 5:
                break
        stream.close()
    server.assert_generation_stops()  # the upstream's own count of running requests


class _FakeUpstream(BaseHTTPRequestHandler):
    """An upstream that lists the model, then (in the test) goes away."""

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"object": "list", "data": [{"id": "smollm2", "object": "model",
                                                        "owned_by": "vllm",
                                                        "max_model_len": 2048}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _assert_502_in_each_shape(url: str) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=url, timeout=30) as http:
        r = chat(http)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["type"] == "server_error"
        r = http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                      json={"model": "smollm2", "max_tokens": 4, "messages": MSG})
        assert r.status_code == 502 and r.json()["error"]["type"] == "api_error", r.text
        r = http.post("/api/chat", json={"model": "smollm2", "messages": MSG, "stream": False})
        assert r.status_code == 502 and set(r.json()) == {"error", "request_id"}, r.text
    assert time.monotonic() < deadline  # answered, not hung


def test_an_upstream_that_goes_down_is_a_502_in_each_shape(tmp_path):
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _FakeUpstream)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    front = start_server(str(tmp_path), "--upstream",
                         f"smollm2=http://127.0.0.1:{fake.server_port}/v1")
    try:
        assert httpx.get(f"{front.base_url}/models").json()["data"][0]["id"] == "smollm2"
        fake.shutdown()
        fake.server_close()
        _assert_502_in_each_shape(front.url)
        streamed = httpx.post(f"{front.base_url}/chat/completions", timeout=30, json={
            "model": "smollm2", "messages": MSG, "stream": True})
        assert streamed.status_code == 502 and "cannot be reached" in streamed.text
    finally:
        stop_server(front)


def test_an_upstream_that_was_never_up_is_a_502_in_each_shape(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    front = start_server(str(tmp_path), "--upstream", f"smollm2=http://127.0.0.1:{port}/v1",
                         wait=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{front.url}/health", timeout=2)
                if health.json()["status"] == "error":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, front.log()
            time.sleep(0.2)
        assert health.status_code == 503
        assert "ConnectError" in health.json()["models"]["smollm2"]["error"]
        _assert_502_in_each_shape(front.url)
    finally:
        stop_server(front)


# -- limits ------------------------------------------------------------------------------------

EMBED_KEY = "sk-embed-5a1f0c3e"


@pytest.fixture(scope="module")
def keyed_front(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A front whose one key may use 8 tokens a minute."""
    tmp = tmp_path_factory.mktemp("keyed-front")
    keys = tmp / "keys"
    keys.write_text(f"{EMBED_KEY} name=embedder tpm=8\n", encoding="utf-8")
    yield from own_server(tmp_path_factory, "keyed-front", "--upstream",
                          f"smollm2={server.base_url}", "--data-dir", str(tmp),
                          "--api-key-file", str(keys))


def test_upstream_embeddings_count_against_the_key_s_tokens_a_minute(keyed_front):
    tokens = [1000 + i for i in range(12)]  # token ids: counted as sent
    headers = {"Authorization": f"Bearer {EMBED_KEY}"}
    with httpx.Client(base_url=keyed_front.url, headers=headers, timeout=120) as http:
        # Each input alone is past the limit: of three quick requests (at most two minute
        # windows), one at least comes after its window was used up.
        answers = [http.post("/v1/embeddings", json={"model": "smollm2", "input": tokens})
                   for _ in range(3)]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["usage"]["prompt_tokens"] == 12
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers]
    error = refused[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "tokens" in error["message"], error
    assert 1 <= int(refused[0].headers["retry-after"]) <= 60


# -- llama-server as the upstream --------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_server(model_path: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("no llama-server binary: set LLAMA_SERVER, put one on PATH, or build the "
                    "peers' (benchmarks/peers)")
    tmp = str(tmp_path_factory.mktemp("llama-server"))
    port = free_port()
    log_path = os.path.join(tmp, "llama-server.log")
    proc = subprocess.Popen([binary, "-m", model_path, "--alias", "smollm2", "--host",
                             "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "2",
                             "-t", "2", "--no-webui"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    wait_ready(srv)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def llama_front(llama_server: Server, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "llama-front", "--upstream",
                          f"smollm2={llama_server.base_url}")


def test_llama_server_as_the_upstream(llama_front):
    with httpx.Client(base_url=llama_front.url, timeout=120) as http:
        r = chat(http)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        r = http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                      json={"model": "smollm2", "max_tokens": 8, "messages": MSG})
        assert r.status_code == 200, r.text
        r = http.post("/api/chat", json={"model": "smollm2", "messages": MSG, "stream": False,
                                         "options": {"num_predict": 8}})
        assert r.status_code == 200 and r.json()["done"], r.text
        # llama-server has /tokenize: the front counts tokens through it
        r = http.post("/api/embed", json={"model": "smollm2", "input": "hello world"})
        assert r.status_code != 400 or "/tokenize" not in r.text, r.text
