"""The SGLang-style runtime API against the real server and model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.model.conftest import start_server, stop_server

GREEDY = {"temperature": 0, "max_new_tokens": 6}
PROMPT = "The capital of France is"
# Long enough to be shared under either KV layout (split streams copy 16 tokens or more).
LONG = "The capital of Italy is Rome. The capital of Spain is Madrid. The capital of France is"


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def generate(http: httpx.Client, **body: Any) -> Any:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_frames(http: httpx.Client, body: dict[str, Any]) -> list[Any]:
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                for line in r.iter_lines() if line.startswith("data: ")]


def test_generate_text_and_input_ids(http):
    one = generate(http, text=PROMPT, rid="fr-1", sampling_params=GREEDY)
    meta = one["meta_info"]
    assert one["text"] and len(one["output_ids"]) == meta["completion_tokens"] == 6
    assert meta["id"] == "fr-1" and meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] > 0 and meta["e2e_latency"] > 0 and "cached_tokens" in meta
    again = generate(http, text=PROMPT, sampling_params=GREEDY)
    assert again["text"] == one["text"]  # greedy
    long = generate(http, text=LONG, sampling_params=GREEDY)["meta_info"]
    repeated = generate(http, text=LONG, sampling_params=GREEDY)["meta_info"]
    assert long["prompt_tokens"] >= 17
    assert repeated["cached_tokens"] == long["prompt_tokens"] - 1
    ids = generate(http, input_ids=one["output_ids"], sampling_params=GREEDY)
    assert ids["meta_info"]["prompt_tokens"] == 6 and len(ids["output_ids"]) == 6


def test_batches_and_n(http):
    batch = generate(http, text=[PROMPT, "1, 2, 3,"], sampling_params={"temperature": 0,
                                                                       "max_new_tokens": 3})
    assert isinstance(batch, list) and len(batch) == 2
    assert len({b["meta_info"]["id"] for b in batch}) == 2
    assert all(b["meta_info"]["completion_tokens"] == 3 for b in batch)
    ids = generate(http, input_ids=[[504, 3575], [28, 216]],
                   sampling_params=[{"max_new_tokens": 2}, {"max_new_tokens": 1}])
    assert [b["meta_info"]["completion_tokens"] for b in ids] == [2, 1]
    samples = generate(http, text=PROMPT, sampling_params={"n": 2, "max_new_tokens": 2,
                                                           "sampling_seed": 1})
    assert isinstance(samples, list) and len(samples) == 2


def test_stream_is_cumulative_and_ends_with_done(http):
    whole = generate(http, text=PROMPT, sampling_params=GREEDY)
    frames = stream_frames(http, {"text": PROMPT, "sampling_params": GREEDY})
    assert frames[-1] == "[DONE]"
    bodies = frames[:-1]
    assert all(b["meta_info"]["finish_reason"] is None for b in bodies[:-1])
    assert all(later["text"].startswith(earlier["text"])
               for earlier, later in zip(bodies, bodies[1:]))
    assert bodies[-1]["text"] == whole["text"] and bodies[-1]["output_ids"] == whole["output_ids"]
    assert bodies[-1]["meta_info"]["finish_reason"]["type"] == "length"
    batch = stream_frames(http, {"text": [PROMPT, "Hi"], "sampling_params": {"max_new_tokens": 2}})
    assert {b["index"] for b in batch[:-1]} == {0, 1}


def test_stop_strings_and_end_of_turn(http):
    stopped = generate(http, text=PROMPT, sampling_params={"temperature": 0, "stop": ["."],
                                                           "max_new_tokens": 20})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": "."}
    assert "." not in stopped["text"]
    kept = generate(http, text=PROMPT, sampling_params={"temperature": 0, "stop": ["."],
                                                        "max_new_tokens": 20,
                                                        "no_stop_trim": True})
    assert kept["text"] == stopped["text"] + "."
    period = stopped["output_ids"][-1]  # the stop string's token, then as a stop token id
    by_id = generate(http, text=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 20,
                                                         "stop_token_ids": [period]})
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": period}
    assert by_id["output_ids"][-1] == period and by_id["text"] == stopped["text"]


def test_abort_by_rid_while_streaming(http, server):
    body = {"text": "Once upon a time", "rid": "to-abort", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    frames: list[Any] = []
    with http.stream("POST", "/generate", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            frames.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
            if len(frames) == 3:
                busy = http.post("/generate", json={"text": "x", "rid": "to-abort"})
                assert busy.status_code == 400 and busy.json()["error"]["param"] == "rid"
                assert http.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
    assert frames[-1] == "[DONE]"
    last = frames[-2]["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and last["completion_tokens"] < 400
    server.assert_generation_stops()


def test_flush_cache_drops_the_prefix_cache(http):
    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. " * 3
    generate(http, text=prompt, sampling_params={"max_new_tokens": 1})
    warm = generate(http, text=prompt, sampling_params={"max_new_tokens": 1})
    assert warm["meta_info"]["cached_tokens"] > 0
    flushed = http.post("/flush_cache")
    assert flushed.status_code == 200 and flushed.text.startswith("Cache flushed.")
    cold = generate(http, text=prompt, sampling_params={"max_new_tokens": 1})
    assert cold["meta_info"]["cached_tokens"] == 0


def test_info_and_health(http):
    info = http.get("/model_info").json()
    assert info["served_model_name"] == "smollm2" and info["model_type"] == "llama"
    assert info["model_path"].endswith(".gguf") and info["is_generation"] is True
    assert info["context_length"] == 4096 and info["state"] == "ready"
    assert http.get("/get_model_info").json() == info
    config = http.get("/server_info").json()
    assert config["api_key"] is None and config["models"][0]["max_running_requests"] == 4
    assert config["models"][0]["context_length"] == 4096
    assert config["store"]["kind"] == "sqlite" and config["internal_states"][0]["engine_alive"]
    assert http.get("/health_generate").status_code == 200
    assert http.get("/health").status_code == 200


def test_refusals_and_errors_in_sglang_shape(http):
    cases = [({"text": PROMPT, "token_ids_logprob": [1]}, "token_ids_logprob"),
             ({"text": PROMPT, "lora_path": "x"}, "lora_path"),
             ({"text": PROMPT, "sampling_params": {"structural_tag": "{}"}},
              "sampling_params.structural_tag"),
             ({"text": PROMPT, "sampling_params": {"ebnf": "root ::= (("}},
              "sampling_params.ebnf"),
             ({"text": PROMPT, "return_logprob": True, "logprob_start_len": 99},
              "logprob_start_len"),
             ({"text": PROMPT, "sampling_params": {"tempurature": 0}},
              "sampling_params.tempurature"),
             ({"text": PROMPT, "input_ids": [1]}, "input_ids")]
    for body, param in cases:
        r = http.post("/generate", json=body)
        assert r.status_code == 400, body
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == 400 and error["message"]
    r = http.post("/generate", json={"text": "word " * 5000})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = http.post("/generate", json={"text": PROMPT, "stream": True,
                                     "sampling_params": {"max_new_tokens": 5000}})
    assert r.status_code == 400  # refused before the stream starts


PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def test_structured_output_json_schema_regex_and_ebnf(http):
    params = {"temperature": 0, "max_new_tokens": 80}
    person = generate(http, text="A person as JSON:", sampling_params={
        **params, "json_schema": json.dumps(PERSON)})
    assert person["meta_info"]["finish_reason"]["type"] == "stop", person
    jsonschema.validate(json.loads(person["text"]), PERSON)
    ids = generate(http, input_ids=person["output_ids"][:3], sampling_params={
        **params, "json_schema": PERSON})  # token input gets the grammar too
    jsonschema.validate(json.loads(ids["text"]), PERSON)
    answer = generate(http, text="Is Paris in France? Answer:", sampling_params={
        **params, "regex": "(yes|no), [a-z]{1,8}\\."})
    assert re.fullmatch(r"(yes|no), [a-z]{1,8}\.", answer["text"]), answer["text"]
    ebnf = generate(http, text="Pick a letter:", sampling_params={
        **params, "ebnf": 'root ::= "A" | "B"'})
    assert ebnf["text"] in {"A", "B"}
    frames = stream_frames(http, {"text": "A person as JSON:", "sampling_params": {
        **params, "json_schema": PERSON}})
    assert frames[-2]["text"] == person["text"]


def test_logprobs_of_prompt_and_output(http):
    got = generate(http, text=PROMPT, return_logprob=True, top_logprobs_num=3,
                   logprob_start_len=0, return_text_in_logprobs=True, sampling_params=GREEDY)
    meta = got["meta_info"]
    prompt, output = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(prompt) == meta["prompt_tokens"] and prompt[0][0] is None
    assert all(e[0] <= 0 for e in prompt[1:]) and meta["input_top_logprobs"][0] is None
    assert [e[1] for e in output] == got["output_ids"]
    assert "".join(e[2] for e in output) == got["text"]
    for entry, top in zip(output, meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == entry[1]  # greedy: the likeliest was chosen
        assert abs(top[0][0] - entry[0]) < 1e-4 and top[0][0] >= top[1][0] >= top[2][0]
    tail = generate(http, text=PROMPT, return_logprob=True, logprob_start_len=2,
                    sampling_params=GREEDY)["meta_info"]
    assert [e[:2] for e in tail["input_token_logprobs"]] == \
        [pytest.approx(e[:2], abs=1e-4) for e in prompt[2:]]
    assert all(e[2] is None for e in tail["output_token_logprobs"])
    assert "output_top_logprobs" not in tail
    frames = stream_frames(http, {"text": PROMPT, "return_logprob": True,
                                  "sampling_params": GREEDY})
    assert [e[1] for e in frames[-2]["meta_info"]["output_token_logprobs"]] == got["output_ids"]
    assert frames[-2]["meta_info"]["input_token_logprobs"] == []


def test_server_info_redacts_the_api_key(tmp_path):
    key = "sk-test-secret-4242"
    srv = start_server(str(tmp_path), "smollm2", "--parallel", "1", "--ctx", "512",
                       "--threads", "1", "--data-dir", str(tmp_path), "--api-key", key)
    try:
        assert httpx.get(f"{srv.url}/server_info").status_code == 401
        r = httpx.get(f"{srv.url}/server_info", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and key not in r.text
        assert r.json()["api_key"] == "<redacted>"
    finally:
        stop_server(srv)
