"""The official `ollama` Python client, unchanged, against the real server and model."""

from __future__ import annotations

import math

import httpx
import ollama
import pytest

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

MODEL = "smollm2"
GREEDY = {"temperature": 0, "num_predict": 8}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture()
def oc(target):  # type: ignore[no-untyped-def]
    with ollama.Client(host=target.url, timeout=120) as c:
        yield c


def test_chat_streaming_and_not(oc):
    whole = oc.chat(model=MODEL, messages=HELLO, options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert 0 < whole.eval_count <= 8 and whole.prompt_eval_count > 0
    assert whole.total_duration > 0 and whole.total_duration >= whole.eval_duration >= 0
    parts = list(oc.chat(model=MODEL, messages=HELLO, options=GREEDY, stream=True))
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_duration > 0
    assert oc.chat(model=MODEL, messages=[]).done_reason == "load"


@pytest.mark.local_only("`context` holds the prompt's and the answer's token ids")
def test_generate_streaming_and_not(oc):
    whole = oc.generate(model=MODEL, prompt="Name a colour.", system="Answer in one word.",
                        options=GREEDY)
    assert whole.response and whole.context and whole.done
    parts = list(oc.generate(model=MODEL, prompt="Name a colour.", system="Answer in one word.",
                             options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].context == whole.context
    assert oc.generate(model=MODEL, prompt="").done_reason == "load"


@pytest.mark.local_only("`context` token ids and the local prefix cache")
def test_generate_context_round_trip_reuses_the_prefix(oc, server):
    first = oc.generate(model=MODEL, prompt="My name is Ada. Remember it.", options=GREEDY)
    assert len(first.context) == first.prompt_eval_count + first.eval_count
    cached_before = server.metric("lmserve_prefix_cache_tokens_total")
    second = oc.generate(model=MODEL, prompt="What is my name?", context=first.context,
                         options=GREEDY)
    assert second.context[:len(first.context)] == first.context
    assert second.prompt_eval_count > len(first.context)
    reused = server.metric("lmserve_prefix_cache_tokens_total") - cached_before
    assert reused >= len(first.context) - 1  # the continuation starts from the resident KV


def test_raw_mode_and_num_predict(oc):
    raw = oc.generate(model=MODEL, prompt="The capital of France is", raw=True,
                      options={"temperature": 0, "num_predict": 5})
    assert raw.context is None and raw.prompt_eval_count == 5  # no template around it
    assert raw.eval_count <= 5 and (raw.done_reason == "length") == (raw.eval_count == 5)
    long = oc.generate(model=MODEL, prompt="Count from one to one hundred: one, two,", raw=True,
                       options={"temperature": 0, "num_predict": 3})
    assert long.eval_count == 3 and long.done_reason == "length"


@pytest.mark.local_only("the GGUF header's facts: quantization, parameter size, template")
def test_tags_show_ps(oc):
    tag = next(m for m in oc.list().models if m.model == MODEL)
    assert tag.size > 0 and len(tag.digest) == 64 and tag.modified_at is not None
    assert tag.details.format == "gguf" and tag.details.family == "llama"
    assert tag.details.quantization_level == "Q4_1" and tag.details.parameter_size == "134.52M"
    show = oc.show(MODEL)
    assert "<|im_start|>" in show.template and "FROM " in show.modelfile
    assert show.modelinfo["llama.context_length"] == 8192
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.capabilities == ["completion", "embedding"] and "num_ctx" in show.parameters
    running = next(m for m in oc.ps().models if m.model == MODEL)
    assert running.size_vram == 0 and running.size > tag.size // 2
    assert running.context_length == 4096 and running.expires_at.year == 9999


def test_embed_and_legacy_embeddings(oc):
    r = oc.embed(model=MODEL, input=["hello world", "goodbye"])
    assert len(r.embeddings) == 2 and all(len(v) == 576 for v in r.embeddings)
    assert abs(sum(x * x for x in r.embeddings[0]) - 1) < 1e-4
    assert r.prompt_eval_count > 0 and r.total_duration > 0
    assert len(oc.embed(model=MODEL, input="hello world", dimensions=32).embeddings[0]) == 32
    legacy = oc.embeddings(model=MODEL, prompt="hello world").embedding
    norm = math.sqrt(sum(x * x for x in legacy))
    assert norm > 0 and all(abs(a / norm - b) < 1e-4 for a, b in zip(legacy, r.embeddings[0]))


def test_version_and_liveness(server):
    assert httpx.get(f"{server.url}/api/version").json()["version"]
    assert httpx.get(f"{server.url}/").text == "Ollama is running"
    assert httpx.head(f"{server.url}/").status_code == 200


def test_errors_are_ollama_shaped(oc, server):
    for call in (lambda: oc.chat(model="nope", messages=HELLO),
                 lambda: list(oc.generate(model="nope", prompt="x", stream=True))):
        with pytest.raises(ollama.ResponseError) as exc:
            call()
        assert exc.value.status_code == 404 and 'model "nope" not found' in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        oc.chat(model=MODEL, messages=HELLO, options={"temperature": "hot"})
    assert exc.value.status_code == 400 and "temperature" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        oc.generate(model=MODEL, prompt="x", format={"type": "no-such-type"})
    assert exc.value.status_code == 400 and "format" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        oc.generate(model=MODEL, prompt="x " * 50, raw=True, options={"num_ctx": 16})
    assert exc.value.status_code == 400 and "num_ctx" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        oc.pull("llama3")
    assert exc.value.status_code == 400 and "cannot pull" in exc.value.error
    assert oc.pull(MODEL).status == "success"
    body = httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": "hi"})
    # Ollama's shape, plus the request id every error body carries (X-Request-Id's value)
    assert body.status_code == 400 and set(body.json()) == {"error", "request_id"}
    assert body.json()["request_id"] == body.headers["x-request-id"]
