"""The SGLang dialect without a model: /generate parsing and refusals, finish reasons, cumulative
samples, redaction, and the routes over a service whose engine is the fake runner."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.core.backend import CacheFlush
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    TokenLogprob,
    TokenOutput,
    TopLogprob,
    Usage,
)
from lmserve.dialects.sglang import adapter, encoder
from lmserve.dialects.sglang.schema import GenerateRequest
from lmserve.http.access import AccessSettings
from lmserve.http.app import StoreSettings, create_app
from lmserve.http.keys import KeyRing
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings, ModelService
from tests.unit.fakes import FakeRunner
from tests.unit.dialects.ollama.test_ollama import make_ready


def plan(**body: Any) -> adapter.GeneratePlan:
    rids = iter(f"r{i}" for i in range(100))
    return adapter.generate_plan(GenerateRequest(**body), new_rid=lambda: next(rids))


def refusal(**body: Any) -> LmserveError:
    with pytest.raises(LmserveError) as exc:
        plan(**body)
    return exc.value


# -- adapter ----------------------------------------------------------------------------------

def test_single_text_uses_sglang_defaults():
    p = plan(text="hello")
    (job,) = p.jobs
    r = job.request
    assert not p.listed and job.rid == "r0" and r.request_id == "r0"
    assert r.prompt == "hello" and r.prompt_tokens is None and r.max_tokens == 128
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (1.0, 1.0, 0, 0, 1)
    assert (r.n, r.stop, r.ignore_eos) == (1, [], False)


def test_sampling_params_map_to_the_engine():
    p = plan(input_ids=[1, 2, 3], rid="mine", sampling_params={
        "max_new_tokens": 7, "temperature": 1e-9, "top_p": 0.5, "top_k": 20, "min_p": 0.1,
        "stop": "END", "stop_token_ids": [9], "ignore_eos": True, "frequency_penalty": 0.5,
        "presence_penalty": -0.5, "repetition_penalty": 1.2, "n": 3, "sampling_seed": 11,
        "logit_bias": {"5": -100}, "stream_interval": 4, "no_stop_trim": True,
        "spaces_between_special_tokens": False})
    (job,) = p.jobs
    r, s = job.request, job.request.sampling
    assert r.prompt_tokens == [1, 2, 3] and r.prompt is None and job.rid == "mine"
    assert (r.max_tokens, r.stop, r.stop_token_ids, r.ignore_eos, r.n) == (7, ["END"], [9], True, 3)
    assert s.greedy and (s.top_p, s.top_k, s.min_p, s.seed) == (0.5, 20, 0.1, 11)
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (0.5, -0.5, 1.2)
    assert s.logit_bias == {5: -100} and job.stream_interval == 4 and job.no_stop_trim
    assert p.listed and p.offsets == [0]  # n > 1 answers with a list
    assert plan(text="x", sampling_params={"max_new_tokens": None}).jobs[0].request.max_tokens \
        is None


def test_batches_of_text_and_ids_with_per_prompt_params():
    p = plan(text=["a", "b"], sampling_params=[{"n": 2}, {"max_new_tokens": 3}],
             rid=["x", "y"])
    assert p.listed and [j.rid for j in p.jobs] == ["x", "y"] and p.offsets == [0, 2]
    assert [j.request.n for j in p.jobs] == [2, 1] and p.jobs[1].request.max_tokens == 3
    ids = plan(input_ids=[[1, 2], [3]], sampling_params={"temperature": 0})
    assert [j.request.prompt_tokens for j in ids.jobs] == [[1, 2], [3]]
    assert all(j.request.sampling.greedy for j in ids.jobs) and ids.listed
    assert [j.rid for j in ids.jobs] == ["r0", "r1"]


@pytest.mark.parametrize("body, param", [
    ({"text": "a", "input_ids": [1]}, "input_ids"),
    ({}, "text"),
    ({"text": []}, "text"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [[1], []]}, "input_ids[1]"),
    ({"text": ["a", "b"], "rid": "one"}, "rid"),
    ({"text": ["a", "b"], "rid": ["x"]}, "rid"),
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
    ({"text": "a", "sampling_params": {"colour": 1}}, "sampling_params.colour"),
    ({"text": ["a", "b"], "sampling_params": [{}, {"top_k": 0}]}, "sampling_params[1].top_k"),
    ({"text": "a", "sampling_params": {"stop": ["a", 3]}}, "sampling_params.stop[1]"),
    ({"text": "a", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
    ({"text": "a", "sampling_params": {"logit_bias": {"x": 1}}}, "sampling_params.logit_bias"),
    ({"text": "a", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
    ({"text": "a", "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num"),
    ({"text": "a", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
    ({"text": "a", "top_logprobs_num": 5}, "top_logprobs_num"),  # needs return_logprob
    ({"text": "a", "logprob_start_len": 0}, "logprob_start_len"),
    ({"text": ["a", "b"], "return_logprob": [True]}, "return_logprob"),
    ({"text": "a", "sampling_params": {"json_schema": "{nope"}}, "sampling_params.json_schema"),
    ({"text": "a", "sampling_params": {"json_schema": "[1]"}}, "sampling_params.json_schema"),
    ({"text": "a", "sampling_params": {"regex": "a", "ebnf": "root ::= \"a\""}},
     "sampling_params.ebnf"),
])
def test_invalid_requests_name_the_parameter(body, param):
    err = refusal(**body)
    assert err.kind is ErrorKind.INVALID_REQUEST and err.param == param, err


@pytest.mark.parametrize("body, param", [
    ({"token_ids_logprob": [1]}, "token_ids_logprob"),
    ({"image_data": "x.png"}, "image_data"),
    ({"return_hidden_states": True}, "return_hidden_states"),
    ({"sampling_params": {"structural_tag": "{}"}}, "sampling_params.structural_tag"),
    ({"sampling_params": {"stop_regex": "a+"}}, "sampling_params.stop_regex"),
    ({"sampling_params": {"min_new_tokens": 2}}, "sampling_params.min_new_tokens"),
    ({"sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
    ({"sampling_params": {"skip_special_tokens": False}}, "sampling_params.skip_special_tokens"),
])
def test_unimplemented_fields_are_refused_by_name(body, param):
    err = refusal(text="a", **body)
    assert err.kind is ErrorKind.UNSUPPORTED and err.param == param and "not supported" in \
        err.message
    # Their neutral values pass, as SGLang clients send them by default.
    plan(text="a", return_logprob=False, top_logprobs_num=0, logprob_start_len=-1,
         lora_path=None, return_hidden_states=False, return_text_in_logprobs=True)


def test_structured_output_becomes_a_response_format():
    def fmt(**params: Any) -> Any:
        return plan(text="a", sampling_params=params).jobs[0].request.response_format
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for given in (json.dumps(schema), schema):
        got = fmt(json_schema=given)
        assert (got.type, got.schema, got.param) == ("json_schema", schema,
                                                     "sampling_params.json_schema")
    got = fmt(regex="[0-9]+")
    assert (got.type, got.pattern, got.param) == ("regex", "[0-9]+", "sampling_params.regex")
    got = fmt(ebnf='root ::= "yes" | "no"')
    assert (got.type, got.grammar) == ("gbnf", 'root ::= "yes" | "no"')
    assert fmt() is None


def test_logprob_fields_map_per_prompt():
    p = plan(text=["a", "b"], return_logprob=[True, False], top_logprobs_num=[3, 0],
             logprob_start_len=[0, -1], return_text_in_logprobs=True)
    first, second = (j.request for j in p.jobs)
    assert (first.logprobs, first.prompt_logprobs) == (3, 3)
    assert p.jobs[0].logprobs == encoder.LogprobShape(top=3, start=0, text=True)
    assert (second.logprobs, second.prompt_logprobs, p.jobs[1].logprobs) == (None, None, None)
    only_output = plan(text="a", return_logprob=True).jobs[0]
    assert (only_output.request.logprobs, only_output.request.prompt_logprobs) == (0, None)
    assert only_output.logprobs == encoder.LogprobShape()


# -- encoder ----------------------------------------------------------------------------------

def out(text: str = "", ids: tuple[int, ...] = (), reason: str | None = None,
        match: str | None = None, usage: Usage | None = None, index: int = 0) -> TokenOutput:
    return TokenOutput(index=index, text=text, token_ids=list(ids), finish_reason=reason,
                       stop_match=match, usage=usage)


def test_finish_reasons_follow_sglang():
    ids = frozenset({42})
    assert encoder.finish_reason(out("a"), ids) is None
    assert encoder.finish_reason(out(ids=(2,), reason=FINISH_STOP), ids) == \
        {"type": "stop", "matched": 2}  # EOS: the token id
    assert encoder.finish_reason(out(ids=(42,), reason=FINISH_STOP, match="42"), ids) == \
        {"type": "stop", "matched": 42}
    assert encoder.finish_reason(out(ids=(7,), reason=FINISH_STOP, match="42"), ids) == \
        {"type": "stop", "matched": "42"}  # a stop string that looks like a number
    assert encoder.finish_reason(out(reason=FINISH_LENGTH, usage=Usage(3, 5)), ids) == \
        {"type": "length", "length": 5}
    assert encoder.finish_reason(out(reason=FINISH_CANCELLED), ids)["type"] == "abort"
    failed = TokenOutput(index=0, finish_reason=FINISH_ERROR, error="boom")
    assert "boom" in encoder.finish_reason(failed, ids)["message"]


def test_samples_are_cumulative_and_stream_every_interval():
    sample = encoder.Sample(rid="r", position=3, prompt_tokens=4)
    sample.add(out("Hel", (1,)))
    assert not sample.due(2) and sample.due(1)
    sample.add(out("lo", (2,)))
    assert sample.due(2)
    first = sample.body(indexed=True)
    assert first == {"text": "Hello", "output_ids": [1, 2], "index": 3, "meta_info": {
        "id": "r", "finish_reason": None, "prompt_tokens": 4, "completion_tokens": 2}}
    assert not sample.due(2)  # a body resets the count
    sample.add(out("!", (3,), FINISH_LENGTH, usage=Usage(4, 3, cached_tokens=2)))
    sample.e2e_latency = 0.25
    last = sample.body(indexed=False)
    assert last["text"] == "Hello!" and "index" not in last and sample.due(99)
    assert last["meta_info"] == {"id": "r", "finish_reason": {"type": "length", "length": 3},
                                 "prompt_tokens": 4, "completion_tokens": 3,
                                 "cached_tokens": 2, "e2e_latency": 0.25}


def test_no_stop_trim_keeps_the_matched_stop_string():
    kept = encoder.Sample(rid="r", position=0, prompt_tokens=1, no_stop_trim=True)
    kept.add(out("Hi", (5, 6), FINISH_STOP, match="END", usage=Usage(1, 2)))
    trimmed = encoder.Sample(rid="r", position=0, prompt_tokens=1)
    trimmed.add(out("Hi", (5, 6), FINISH_STOP, match="END", usage=Usage(1, 2)))
    assert (kept.text, trimmed.text) == ("HiEND", "Hi")
    assert kept.finish == {"type": "stop", "matched": "END"}


def lp(token: int, logprob: float | None, *top: tuple[int, float]) -> TokenLogprob:
    return TokenLogprob(token, f"t{token}".encode(), logprob,
                        tuple(TopLogprob(t, f"t{t}".encode(), v) for t, v in top))


def test_logprobs_in_meta_info_follow_sglang():
    prompt = [lp(1, None), lp(2, -1.5, (9, -0.5)), lp(3, -2.0, (3, -2.0))]
    shape = encoder.LogprobShape(top=1, start=1, text=True)
    sample = encoder.Sample(rid="r", position=0, prompt_tokens=3, logprobs=shape)
    first = out("x", (5,))
    first.prompt_logprobs, first.logprobs = prompt, [lp(5, -0.25, (5, -0.25))]
    sample.add(first)
    second = out("\ufffd", (6,), FINISH_LENGTH, usage=Usage(3, 2))
    second.logprobs = [TokenLogprob(6, b"\xe2", -3.0, (TopLogprob(7, b"ok", -1.0),))]
    sample.add(second)
    meta = sample.body(indexed=False)["meta_info"]
    assert meta["input_token_logprobs"] == [[-1.5, 2, "t2"], [-2.0, 3, "t3"]]
    assert meta["input_top_logprobs"] == [[[-0.5, 9, "t9"]], [[-2.0, 3, "t3"]]]
    assert meta["output_token_logprobs"] == [[-0.25, 5, "t5"], [-3.0, 6, "\ufffd"]]
    assert meta["output_top_logprobs"] == [[[-0.25, 5, "t5"]], [[-1.0, 7, "ok"]]]
    whole = encoder.logprob_meta(encoder.LogprobShape(top=0, start=0), prompt, [])
    assert whole == {"input_token_logprobs": [[None, 1, None], [-1.5, 2, None], [-2.0, 3, None]],
                     "output_token_logprobs": []}  # no top fields without top_logprobs_num
    assert encoder.top_logprobs(prompt[:1], True) == [None]  # nothing precedes the first
    plain = encoder.Sample(rid="r", position=0, prompt_tokens=3)
    plain.add(first)
    assert "output_token_logprobs" not in plain.body(indexed=False)["meta_info"]


def test_error_body_and_model_info_shapes():
    err = LmserveError(ErrorKind.UNSUPPORTED, "no", param="lora_path")
    assert encoder.error_body(err) == {"error": {"message": "no", "type": "Bad Request",
                                                 "param": "lora_path", "code": 400}}
    info = encoder.model_info(name="m", path="/x.gguf", architecture="llama", generation=True,
                              context_length=4096, extra={"state": "ready"})
    assert info["model_path"] == info["tokenizer_path"] == "/x.gguf"
    assert (info["served_model_name"], info["model_type"], info["architectures"]) == \
        ("m", "llama", ["llama"])
    assert info["is_generation"] and info["state"] == "ready"


def test_redaction_hides_secrets_and_keeps_the_rest():
    config = {"api_key": "k1", "api_keys": ["k1"], "max_tokens": 5, "cache_tokens": 7,
              "store": {"url": "redis://user:hunter2@db:6379/0", "password": None,
                        "redis_password": "hunter2"},
              "other": "redis://db:6379/0", "copied": ["k2"], "access_token": "t",
              "nested": [{"secret": "s"}]}
    safe = encoder.redact(config, frozenset({"k2"}))
    assert json.dumps(safe).count(encoder.REDACTED) == 7
    for secret in ("k1", "k2", "hunter2", '"t"', '"s"'):
        assert secret not in json.dumps(safe)
    assert safe["store"]["url"] == f"redis://user:{encoder.REDACTED}@db:6379/0"
    assert (safe["max_tokens"], safe["cache_tokens"], safe["other"]) == (5, 7, "redis://db:6379/0")
    assert safe["store"]["password"] is None  # nothing to hide
    assert encoder.redact("redis://:pw@[::1]:6379") == f"redis://:{encoder.REDACTED}@[::1]:6379"


# -- flush_cache on the engine thread ---------------------------------------------------------

async def test_service_flush_cache_refuses_while_requests_run():
    service = ModelService("m", "/x.gguf", EngineSettings())
    service.state, service.model = "ready", object()  # type: ignore[assignment]
    pool = SimpleNamespace(flush=lambda: 3, disk=None)
    core = SimpleNamespace(has_work=True, pool=pool)

    async def call(fn):  # type: ignore[no-untyped-def]
        return fn(core)
    service.client = SimpleNamespace(call=call, alive=True)  # type: ignore[assignment]
    assert await service.flush_cache() is None
    core.has_work = False
    assert await service.flush_cache() == CacheFlush(3)
    pool.disk = SimpleNamespace(clear=lambda: 2)  # --disk-cache: its states go too
    assert await service.flush_cache() == CacheFlush(3, disk_states=2)
    pool.disk = SimpleNamespace(clear=lambda: None)  # its writes did not finish in time
    flushed = await service.flush_cache()
    assert flushed is not None and flushed.disk_kept and flushed.disk_states == 0


# -- HTTP over the fake engine ----------------------------------------------------------------

@contextlib.contextmanager
def client(runner: FakeRunner | None = None, **app: Any) -> Iterator[TestClient]:
    registry = ModelRegistry()
    service = registry.add("tiny", resolve("smollm2").path, EngineSettings())
    with TestClient(create_app(registry, load_on_startup=False,
                               store=StoreSettings(url="memory"), **app)) as test_client:
        if runner is not None:
            test_client.portal.call(make_ready, service, runner)  # type: ignore[union-attr]
        yield test_client


def frames(response) -> list[Any]:  # type: ignore[no-untyped-def]
    assert response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.text.splitlines() if line.startswith("data: ")]


def test_generate_single_batch_and_stream():
    with client(FakeRunner(n_ctx=512)) as c:
        one = c.post("/generate", json={"text": "ab", "rid": "q1",
                                        "sampling_params": {"max_new_tokens": 3}}).json()
        assert one["meta_info"]["id"] == "q1" and len(one["output_ids"]) == 3
        assert one["text"] == "".join(f"<{t}>" for t in one["output_ids"])
        meta = one["meta_info"]
        assert meta["finish_reason"] == {"type": "length", "length": 3}
        assert (meta["prompt_tokens"], meta["completion_tokens"]) == (2, 3)
        assert meta["cached_tokens"] == 0 and meta["e2e_latency"] > 0
        batch = c.put("/generate", json={"input_ids": [[3, 4], [5]],
                                         "sampling_params": {"max_new_tokens": 2}}).json()
        assert [len(b["output_ids"]) for b in batch] == [2, 2] and "index" not in batch[0]
        got = frames(c.post("/generate", json={"text": "ab", "stream": True,
                                                "sampling_params": {"max_new_tokens": 3}}))
        assert got[-1] == "[DONE]" and len(got) == 4
        assert [f["meta_info"]["completion_tokens"] for f in got[:-1]] == [1, 2, 3]
        assert got[2]["text"] == one["text"]
        assert got[2]["meta_info"]["cached_tokens"] == 1  # all but the prompt's last token
        assert all(got[i + 1]["text"].startswith(got[i]["text"]) for i in range(2))
        sampled = frames(c.post("/generate", json={"text": ["ab", "c"], "stream": True,
                                                   "sampling_params": {"max_new_tokens": 1}}))
        assert sorted(f["index"] for f in sampled[:-1]) == [0, 1]


def test_generate_returns_logprobs_over_http():
    with client(FakeRunner(n_ctx=512)) as c:
        body = {"input_ids": [3, 4, 5], "return_logprob": True, "top_logprobs_num": 2,
                "logprob_start_len": 1, "sampling_params": {"max_new_tokens": 3}}
        meta = c.post("/generate", json=body).json()["meta_info"]
        assert [e[1] for e in meta["input_token_logprobs"]] == [4, 5]
        assert all(e[0] < 0 and e[2] is None for e in meta["input_token_logprobs"])
        assert len(meta["output_token_logprobs"]) == 3 == len(meta["output_top_logprobs"])
        assert all(len(top) == 2 for top in meta["output_top_logprobs"])
        got = frames(c.post("/generate", json={**body, "stream": True}))
        assert [len(f["meta_info"]["output_token_logprobs"]) for f in got[:-1]] == [1, 2, 3]
        assert got[-2]["meta_info"]["input_token_logprobs"] == meta["input_token_logprobs"]
        r = c.post("/generate", json={**body, "logprob_start_len": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprob_start_len"


def test_errors_info_flush_and_abort():
    keys = KeyRing(["sekret"], admin_keys=["root"])
    with client(FakeRunner(n_ctx=64), access=AccessSettings(keys=keys)) as c:
        key = {"x-api-key": "sekret"}
        assert c.post("/generate", json={"text": "a"}).status_code == 401
        r = c.post("/generate", headers=key, json={"text": "a" * 80})
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
        r = c.post("/generate", headers=key, json={"text": "a", "lora_path": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        r = c.post("/generate", headers=key, json={"text": 5})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400
        info = c.get("/model_info", headers=key).json()
        assert info["served_model_name"] == "tiny" and info["model_type"] == "llama"
        assert c.get("/get_model_info", headers=key).json() == info
        text = c.get("/server_info", headers=key).text
        assert "sekret" not in text and encoder.REDACTED in text
        assert json.loads(text)["models"][0]["max_running_requests"] == 8
        assert c.get("/get_server_info", headers=key).status_code == 200
        assert c.get("/health_generate", headers=key).status_code == 200
        assert c.post("/flush_cache").status_code == 401
        refused = c.post("/flush_cache", headers=key)  # administers the server: admin keys only
        assert refused.status_code == 403 and refused.json()["error"]["code"] == 403
        key = {"x-api-key": "root"}
        flushed = c.post("/flush_cache", headers=key)
        assert flushed.status_code == 200 and flushed.text.startswith("Cache flushed.")
        assert c.get("/flush_cache", headers=key).status_code == 200
        service = next(iter(c.app.state.registry))

        async def busy() -> None:
            return None
        service.flush_cache = busy
        refused = c.post("/flush_cache", headers=key)
        assert refused.status_code == 400 and refused.text.startswith("Cache not flushed")
        assert c.post("/abort_request", headers=key, json={"rid": "unknown"}).status_code == 200
        r = c.post("/abort_request", headers=key, json={})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rid"
        assert c.post("/abort_request", headers=key, json={"abort_all": True}).status_code == 200


def test_loading_model_answers_503():
    with client() as c:
        assert c.get("/health_generate").status_code == 503
        r = c.post("/generate", json={"text": "a"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.post("/flush_cache").status_code == 503
        assert c.get("/model_info").json()["state"] == "pending"
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/generate", "/model_info", "/server_info", "/flush_cache", "/abort_request",
                "/health_generate"} <= set(paths)
