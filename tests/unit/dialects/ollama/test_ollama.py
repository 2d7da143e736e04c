"""The Ollama dialect without a model: options, validation, frames, catalogue, and the HTTP
routes over a service whose engine is the fake runner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lmserve.chat.templates import ChatTemplate
from lmserve.core.backend import ChoiceStep, choice_step
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import FINISH_LENGTH, FINISH_STOP, TokenOutput, Usage
from lmserve.core.request import GenerationRequest
from lmserve.dialects.ollama import adapter, encoder
from lmserve.dialects.ollama.schema import ChatRequest, GenerateRequest
from lmserve.engine.client import EngineClient
from lmserve.engine.scheduler import EngineCore
from lmserve.http.app import create_app
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings, ModelService
from tests.unit.fakes import VOCAB, FakeRunner

USER = [{"role": "user", "content": "hi"}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def refused(fn, *args) -> LmserveError:  # type: ignore[no-untyped-def]
    with pytest.raises(LmserveError) as exc:
        fn(*args)
    return exc.value


# -- adapter ----------------------------------------------------------------------------------

def test_options_map_to_sampling_with_ollama_defaults():
    opts = adapter.parse_options({"temperature": 0.2, "top_p": 0.5, "top_k": 7, "min_p": 0.1,
                                  "seed": 42, "stop": ["END", ""], "repeat_penalty": 1.3,
                                  "repeat_last_n": 32, "presence_penalty": 0.4,
                                  "frequency_penalty": 0.6, "num_predict": 12.0})
    s = opts.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.2, 0.5, 7, 0.1, 42)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.3, 0.4, 0.6)
    assert opts.stop == ("END",) and opts.num_predict == 12 and opts.repeat_last_n == 32
    d = adapter.parse_options(None)
    assert (d.sampling.temperature, d.sampling.top_k, d.sampling.top_p) == (0.8, 40, 0.9)
    assert d.sampling.repetition_penalty == 1.1 and d.sampling.seed is None
    assert adapter.parse_options({"seed": -1, "stop": "x"}).sampling.seed is None
    assert adapter.parse_options({"stop": "x"}).stop == ("x",)


def test_bad_unknown_and_unimplemented_options_are_refused_by_name():
    assert "temprature" in refused(adapter.parse_options, {"temprature": 1}).message
    err = refused(adapter.parse_options, {"temperature": "hot"})
    assert err.kind is ErrorKind.INVALID_REQUEST and err.param == "options.temperature"
    for bad in ({"top_p": 0}, {"num_predict": -3}, {"num_predict": 1.5}, {"num_ctx": 0}):
        assert refused(adapter.parse_options, bad).kind is ErrorKind.INVALID_REQUEST
    for key, value in (("typical_p", 0.5), ("tfs_z", 0.9), ("mirostat", 2),
                       ("penalize_newline", False)):
        assert refused(adapter.parse_options, {key: value}).kind is ErrorKind.UNSUPPORTED
    opts = adapter.parse_options({"typical_p": 1.0, "num_thread": 8, "use_mmap": True,
                                  "num_keep": 4, "mirostat": 0, "temperature": None})
    assert opts.without_effect == ["num_thread", "use_mmap", "num_keep"]


def test_num_predict_num_ctx_and_repeat_window():
    def base(opts: adapter.Options) -> GenerationRequest:  # what chat_job makes of them
        return GenerationRequest(messages=[], max_tokens=opts.num_predict)
    for value in (-1, -2, 0):
        opts = adapter.parse_options({"num_predict": value})
        assert opts.num_predict is None
        assert adapter.finalize(base(opts), opts, 100, 30).max_tokens == 70  # until full
    big_predict = adapter.parse_options({"num_predict": 500})
    capped = adapter.finalize(base(big_predict), big_predict, 100, 30)
    assert capped.max_tokens == 70 and capped.sampling.penalty_last_n == 64
    small = adapter.parse_options({"num_ctx": 50, "num_predict": 5, "repeat_last_n": -1})
    gen = adapter.finalize(base(small), small, 100, 30)
    assert gen.max_tokens == 5 and gen.sampling.penalty_last_n == 50
    err = refused(adapter.finalize, base(small), small, 100, 50)
    assert err.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED and "num_ctx" in err.message
    big = adapter.parse_options({"num_ctx": 8192, "num_thread": 2})
    assert adapter.window(big, 4096) == 4096
    note = adapter.notice(big, 4096)
    assert "num_thread" in note and "capped at the loaded context of 4096" in note
    assert "keep_alive" not in note and adapter.notice(small, 100) is None
    assert adapter.notice(small, 100, embedding=True) == \
        "no effect here: num_predict, repeat_last_n"


def test_keep_alive_durations():
    seconds = adapter.keep_alive_seconds
    assert [seconds(v) for v in (None, 30, "300", "5m", "1h30m", "-1", "-1m", "250ms", "0")] == \
        [None, 30.0, 300.0, 300.0, 5400.0, -1.0, -60.0, 0.25, 0.0]
    for bad in ("5x", "m", "1h 30m", ""):
        assert refused(seconds, bad).param == "keep_alive"


def test_chat_and_generate_refuse_what_is_not_implemented():
    chat = {"model": "m", "messages": USER}
    for extra, param in (({"top_logprobs": 2}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
        err = refused(adapter.chat_job, ChatRequest(**{**chat, **extra}))
        assert err.kind is ErrorKind.INVALID_REQUEST and err.param == param
    job = adapter.chat_job(ChatRequest(**chat, think=False, format="", keep_alive="10m"))
    assert job.keep_alive == 600 and job.request.messages[0].content == "hi"
    assert job.request.reasoning is False and not job.show_thinking
    assert job.request.response_format is None
    history = adapter.chat_job(ChatRequest(model="m", messages=[
        {"role": "assistant", "content": "", "thinking": "hmm",
         "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "3", "tool_name": "f"}])).request.messages
    assert history[0].extra == {"reasoning_content": "hmm", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": 1}}}]} and history[1].name == "f"
    gen = {"model": "m", "prompt": "p"}
    for extra, kind in (({"raw": True, "system": "s"}, ErrorKind.INVALID_REQUEST),
                        ({"raw": True, "context": [1]}, ErrorKind.INVALID_REQUEST),
                        ({"template": "{{ .Prompt }}"}, ErrorKind.UNSUPPORTED),
                        ({"suffix": "end"}, ErrorKind.UNSUPPORTED),
                        ({"raw": True, "images": ["aGk="]}, ErrorKind.INVALID_REQUEST)):
        assert refused(adapter.generate_job, GenerateRequest(**gen, **extra)).kind is kind
    templated = adapter.generate_job(GenerateRequest(**gen, system="be brief")).request
    assert [(m.role, m.content) for m in templated.messages] == [("system", "be brief"),
                                                                 ("user", "p")]
    raw = adapter.generate_job(GenerateRequest(**gen, raw=True)).request
    assert raw.prompt == "p" and raw.messages is None


# -- encoder ----------------------------------------------------------------------------------

def step(*args: Any, **kw: Any) -> ChoiceStep:
    """An engine output as the backend's (unparsed) step."""
    return choice_step(TokenOutput(*args, **kw))


def test_run_frames_final_fields_and_context():
    run = encoder.Run(model="m", chat=False, started_ns=100, loaded_ns=150, submitted_ns=200,
                      prompt_ids=[1, 2])
    assert run.add(step(0, "", [5]), 1_000) is None  # held-back text streams nothing
    frame = run.add(step(0, "Hi", [6]), 2_000)
    assert list(frame) == ["model", "created_at", "response", "done"] and frame["response"] == "Hi"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", frame["created_at"])
    run.add(step(0, "!", [7], finish_reason=FINISH_LENGTH, usage=Usage(2, 3)), 3_000)
    final = run.final(4_000, streamed=True)
    assert final["response"] == "" and final["done"] and final["done_reason"] == "length"
    assert final["context"] == [1, 2, 5, 6, 7]
    assert {k: final[k] for k in ("total_duration", "load_duration", "prompt_eval_count",
                                  "prompt_eval_duration", "eval_count", "eval_duration")} == {
        "total_duration": 3_900, "load_duration": 50, "prompt_eval_count": 2,
        "prompt_eval_duration": 800, "eval_count": 3, "eval_duration": 3_000}
    chat = encoder.Run(model="m", chat=True, started_ns=0, loaded_ns=0, submitted_ns=0)
    chat.add(step(0, "ok", [9], finish_reason=FINISH_STOP, usage=Usage(1, 1)), 10)
    whole = chat.final(20, streamed=False)
    assert whole["message"] == {"role": "assistant", "content": "ok"} and "context" not in whole
    assert whole["done_reason"] == "stop"
    assert encoder.load_response("m", chat=True)["done_reason"] == "load"
    assert encoder.error_body(LmserveError(ErrorKind.INTERNAL, "boom")) == {"error": "boom"}


def test_catalogue_formatting():
    assert [encoder.parameter_size(n) for n in (8_030_261_248, 134_515_008, 7_000_000_000,
                                                500_000, 0)] == ["8.0B", "134.52M", "7B",
                                                                 "500K", ""]
    assert [encoder.quantization_level(t) for t in (3, 15, 1, 0, None, 999)] == \
        ["Q4_1", "Q4_K_M", "F16", "F32", "", ""]
    info = encoder.model_info({"a.count": "30", "a.eps": "0.000010", "a.flag": "true",
                               "general.name": "x", "tokenizer.chat_template": "{{ x }}"}, 7)
    assert info == {"a.count": 30, "a.eps": 1e-05, "a.flag": True, "general.name": "x",
                    "general.parameter_count": 7}
    meta = {"llama.attention.head_count": "9", "llama.attention.head_count_kv": "3",
            "llama.embedding_length": "576"}
    assert encoder.kv_cache_bytes(meta, "llama", 30, 4096) == 4096 * 30 * 3 * 128 * 2
    assert encoder.kv_cache_bytes({}, "llama", 30, 4096) == 0
    vec = encoder.embedding(np.array([3.0, 4.0, 12.0]), 2)
    assert vec == pytest.approx([0.6, 0.8])


# -- HTTP -------------------------------------------------------------------------------------

class FakeModel:
    """Just enough of runner.Model for the service: one token per character."""

    n_vocab = VOCAB

    def __init__(self) -> None:
        self.info = SimpleNamespace(
            architecture="llama", n_params=134_515_008, size_bytes=1000, n_layer=2, n_embd=4,
            n_ctx_train=2048, n_vocab=VOCAB, bos_token="", eos_token="<|im_end|>",
            add_bos=False,
            chat_template=CHATML, metadata={"general.file_type": "3", "general.license": "mit"})

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True
                 ) -> list[int]:
        return [1 + ord(c) % (VOCAB - 1) for c in text]

    def control_tokens(self, texts: set[str]) -> frozenset[int]:
        return frozenset()


async def make_ready(service: ModelService, runner: FakeRunner) -> None:
    service.model, service.n_ctx = FakeModel(), runner.n_ctx  # type: ignore[assignment]
    service.template = ChatTemplate(CHATML, name="tiny")
    service.client = EngineClient(
        lambda sink: EngineCore(runner, n_slots=4, max_running=2, step_tokens=64, sink=sink),
        loop=asyncio.get_running_loop(), max_queue=4)
    service.client.start()
    service.state = "ready"

    async def embed(inputs: list[list[int]], adapters: object = ()) -> list[np.ndarray]:
        return [np.array([float(len(t)), 1.0, 0.0, 0.0]) for t in inputs]
    service.embed = embed  # type: ignore[method-assign]


@contextlib.contextmanager
def client(runner: FakeRunner | None = None, settings: EngineSettings = EngineSettings()
           ) -> Iterator[TestClient]:
    """The app over one model, "tiny": still loading, or ready with the fake engine."""
    registry = ModelRegistry()  # a real GGUF file (its header is read), never loaded
    service = registry.add("tiny", resolve("smollm2").path, settings)
    with TestClient(create_app(registry, load_on_startup=False)) as test_client:
        if runner is not None:
            test_client.portal.call(make_ready, service, runner)  # type: ignore[union-attr]
        yield test_client


def lines(response) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in response.text.splitlines()]


def test_liveness_version_errors_and_management_endpoints():
    with client() as c:
        assert c.get("/").text == "Ollama is running" and c.head("/").status_code == 200
        assert c.get("/api/version").json()["version"]
        r = c.post("/api/chat", json={"model": "nope", "messages": USER})
        assert r.status_code == 404 and r.json()["error"].startswith('model "nope" not found')
        refused = c.post("/api/chat", json={"messages": USER}).json()
        assert refused == {"error": "model is required", "request_id": refused["request_id"]}
        bad = c.post("/api/chat", content=b"[1,", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
        r = c.post("/api/generate", json={"model": "tiny:latest", "prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"] and r.headers["retry-after"]
        assert c.post("/api/pull", json={"model": "tiny"}).text.strip() == '{"status": "success"}'
        for method, path in (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                             ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                             ("POST", "/api/blobs/sha256:00")):
            r = c.request(method, path, json={"model": "other"})
            assert r.status_code == 400 and "lmserve cannot" in r.json()["error"], path
        assert [m["name"] for m in c.get("/api/tags").json()["models"]] == ["tiny"]


def test_chat_stream_frames_and_non_stream_body():
    with client(FakeRunner(n_ctx=512)) as c:
        r = c.post("/api/chat", json={"model": "tiny", "messages": USER,
                                      "options": {"num_predict": 3}})
        assert r.headers["content-type"] == "application/x-ndjson"
        frames = lines(r)
        assert [f["done"] for f in frames] == [False, False, False, True]
        assert all(f["message"]["role"] == "assistant" for f in frames)
        final = frames[-1]
        assert list(final) == ["model", "created_at", "message", "done", "done_reason",
                               "total_duration", "load_duration", "prompt_eval_count",
                               "prompt_eval_duration", "eval_count", "eval_duration"]
        assert final["done_reason"] == "length" and final["eval_count"] == 3
        assert final["total_duration"] >= final["eval_duration"] >= 0
        text = "".join(f["message"]["content"] for f in frames)
        whole = c.post("/api/chat", json={"model": "tiny", "messages": USER, "stream": False,
                                          "options": {"num_predict": 3}}).json()
        assert whole["message"]["content"] == text and whole["done"] is True
        loaded = c.post("/api/chat", json={"model": "tiny", "messages": []}).json()
        assert loaded["done_reason"] == "load"


def test_generate_context_round_trip_raw_and_windows():
    with client(FakeRunner(n_ctx=512)) as c:
        first = c.post("/api/generate", json={"model": "tiny", "prompt": "ab", "stream": False,
                                              "options": {"num_predict": 2}}).json()
        n_prompt = first["prompt_eval_count"]
        assert len(first["context"]) == n_prompt + 2
        again = c.post("/api/generate", json={"model": "tiny", "prompt": "c", "stream": False,
                                              "context": first["context"],
                                              "options": {"num_predict": 2}}).json()
        assert again["context"][:len(first["context"])] == first["context"]
        assert again["prompt_eval_count"] > n_prompt
        raw = c.post("/api/generate", json={"model": "tiny", "prompt": "abc", "raw": True,
                                            "stream": False, "options": {"num_predict": 1}})
        assert raw.json()["prompt_eval_count"] == 3 and "context" not in raw.json()
        r = c.post("/api/generate", json={"model": "tiny", "prompt": "abcdef", "raw": True,
                                          "options": {"num_ctx": 4}})
        assert r.status_code == 400 and "num_ctx" in r.json()["error"]
        r = c.post("/api/generate", json={"model": "tiny", "prompt": "a", "raw": True,
                                          "stream": False,
                                          "options": {"num_ctx": 9999, "num_gpu": 1}})
        assert r.status_code == 200 and "num_gpu" in r.headers["x-lmserve-notice"]
        assert r.json()["eval_count"] == 511  # num_predict unset: until the loaded window is full


def test_error_after_the_stream_started_is_its_last_line():
    with client(FakeRunner(n_ctx=512, kv_capacity=8)) as c:
        r = c.post("/api/generate", json={"model": "tiny", "prompt": "x" * 20, "raw": True})
        assert r.status_code == 200
        assert list(lines(r)[-1]) == ["error", "request_id"]  # and the request's id


def test_embed_show_tags_ps():
    with client(FakeRunner(n_ctx=512), EngineSettings(embedding_ctx=4)) as c:
        r = c.post("/api/embed", json={"model": "tiny", "input": ["abcdefgh", "ab"]}).json()
        assert r["prompt_eval_count"] == 6 and len(r["embeddings"]) == 2
        assert all(abs(sum(x * x for x in v) - 1) < 1e-6 for v in r["embeddings"])
        short = c.post("/api/embed", json={"model": "tiny", "input": "ab", "dimensions": 1})
        assert short.json()["embeddings"] == [[1.0]]
        assert c.post("/api/embed", json={"model": "tiny", "input": []}).json()["embeddings"] == []
        long = c.post("/api/embed", json={"model": "tiny", "input": "abcdefgh", "truncate": False})
        assert long.status_code == 400 and "error" in long.json()
        legacy = c.post("/api/embeddings", json={"model": "tiny", "prompt": "ab"}).json()
        assert legacy == {"embedding": [2.0, 1.0, 0.0, 0.0]}  # not normalised, as in Ollama
        show = c.post("/api/show", json={"model": "tiny"}).json()
        assert show["details"]["quantization_level"] == "Q4_1" and show["license"] == "mit"
        assert show["template"] == CHATML and "num_ctx" in show["parameters"]
        assert show["capabilities"] == ["completion", "embedding"]
        tag = c.get("/api/tags").json()["models"][0]
        assert tag["details"]["parameter_size"] == "134.52M" and len(tag["digest"]) == 64
        ps = c.get("/api/ps").json()["models"][0]
        assert ps["size_vram"] == 0 and ps["context_length"] == 512 and ps["size"] >= 1000
