"""LoRA adapters from configuration to request: specs, the lora fields of each dialect,
"<model>:<alias>" names, and the adapter set a request runs under (fake engine)."""

from __future__ import annotations

import pytest

from lmserve import cli, config
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.lora import (LoraRef, LoraSelection, LoraSpec, assign, describe, parse_spec,
                               parse_specs, resolve, selection_field)
from lmserve.models.registry import ModelRegistry
from lmserve.models.resource import check_params
from lmserve.models.resolve import resolve as resolve_model
from lmserve.service import EngineSettings
from tests.unit.fakes import VOCAB, FakeRunner, adapter_shift, next_token
from tests.unit.dialects.ollama.test_ollama import FakeModel, client

STYLE = LoraSpec("style", "/lora/style.gguf")
HALF = LoraSpec("half", "/lora/style.gguf", 0.5)
OTHER = LoraSpec("other", "/lora/other.gguf", 2.0)
SPECS = (STYLE, HALF, OTHER)


def refusal(fn, *args, **kw) -> LmserveError:  # type: ignore[no-untyped-def]
    with pytest.raises(LmserveError) as info:
        fn(*args, **kw)
    return info.value


# -- configuration ----------------------------------------------------------------------------
def test_the_lora_flag_and_config_entries():
    assert parse_spec("style=/a/b.gguf") == LoraSpec("style", "/a/b.gguf", 1.0)
    assert parse_spec("style=/a/b.gguf:0.25") == LoraSpec("style", "/a/b.gguf", 0.25)
    assert parse_spec(r"w=C:\loras\b.gguf").path == r"C:\loras\b.gguf"  # not a scale
    for bad in ("style", "a:b=/x.gguf", "=/x.gguf", "s=", "s=/x.gguf:nan"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    specs = parse_specs([{"alias": "s", "path": "/x.gguf", "scale": 0.5, "model": "m"},
                         "t=/y.gguf"])
    assert specs == (LoraSpec("s", "/x.gguf", 0.5, "m"), LoraSpec("t", "/y.gguf"))
    for bad_entries in ([{"alias": "s", "path": "/x", "rank": 8}], ["s=/x", "s=/y"],
                        [{"alias": "s", "path": "/x", "scale": "big"}]):
        with pytest.raises(ValueError):
            parse_specs(bad_entries)


def test_loras_from_flags_and_files(tmp_path):
    args = cli.build_parser().parse_args(["serve", "--lora", "a=/x.gguf",
                                          "--lora", "b=/y.gguf:0.3"])
    assert cli.serve_config(args).engine.loras == (LoraSpec("a", "/x.gguf"),
                                                   LoraSpec("b", "/y.gguf", 0.3))
    toml = tmp_path / "lmserve.toml"
    toml.write_text('[model]\npath = "m.gguf"\n'
                    'loras = [{alias = "s", path = "/s.gguf", scale = 0.5}]\n')
    cfg = config.build(config.load_file(str(toml)))
    assert cfg.engine.loras == (LoraSpec("s", "/s.gguf", 0.5),)


def test_adapters_go_to_the_first_model_unless_named(tmp_path):
    files = [tmp_path / f"{n}.gguf" for n in "abc"]
    for f in files:
        f.write_bytes(b"")
    a, b, c = (LoraSpec(n, str(f), model=m) for n, f, m in zip("abc", files, (None, "m2", None)))
    assert assign([a, b, c], ["m1", "m2"]) == {"m1": (a, c), "m2": (b,)}
    with pytest.raises(ValueError, match="not served"):
        assign([LoraSpec("a", str(files[0]), model="m9")], ["m1"])
    with pytest.raises(ValueError, match="no such file"):
        assign([LoraSpec("gone", str(tmp_path / "gone.gguf"))], ["m1"])


# -- a request's choice -----------------------------------------------------------------------
def test_lora_fields_take_a_name_an_object_or_a_list():
    assert selection_field(None, "lora") is None
    assert selection_field("style", "lora") == LoraSelection((LoraRef("style"),))
    assert selection_field([{"name": "style", "scale": 0.5}, "other"], "params.lora").refs == (
        LoraRef("style", 0.5), LoraRef("other"))
    for value, param in ((5, "lora"), ([{"scale": 1}], "lora[0].name"), ("", "lora"),
                         ({"name": "s", "scale": "x"}, "lora.scale"),
                         ({"name": "s", "weight": 1}, "lora")):
        err = refusal(selection_field, value, "lora")
        assert err.kind is ErrorKind.INVALID_REQUEST and err.param == param, (value, err)


def test_resolution_to_an_adapter_set():
    pick = lambda *refs, model=None: resolve(  # noqa: E731
        SPECS, model, LoraSelection(tuple(refs)) if refs else None, ("tiny",))
    assert pick() == ()
    assert pick(model="tiny:style") == (("/lora/style.gguf", 1.0),)
    assert pick(LoraRef("half")) == pick(LoraRef("style", 0.5)) == pick(LoraRef("/lora/style.gguf",
                                                                                0.5))
    assert pick(LoraRef("other"), LoraRef("style")) == pick(LoraRef("style"), LoraRef("other"))
    assert pick(LoraRef("style", 0.0)) == ()  # a zero scale changes nothing: the base group
    unknown = refusal(pick, LoraRef("nope"))
    assert unknown.param == "lora" and unknown.code == "lora_not_found" and "style" in \
        unknown.message
    assert refusal(pick, LoraRef("style"), LoraRef("half")).param == "lora"
    assert refusal(pick, LoraRef("other"), model="tiny:style").param == "lora"
    assert resolve(SPECS, "a:style", None, ("a:style",)) == ()  # a model's own name wins
    assert describe(pick(LoraRef("half"), LoraRef("other")), SPECS) == "other+half"
    assert describe(pick(LoraRef("style", 0.2)), SPECS) == "style@0.2"


def test_model_names_with_an_adapter_find_the_base_model():
    registry = ModelRegistry()
    service = registry.add("tiny", "/models/tiny.gguf", EngineSettings(loras=(STYLE,)))
    assert registry.get("tiny:style") is service
    err = refusal(registry.get, "tiny:nope")
    assert err.kind is ErrorKind.MODEL_NOT_FOUND and "tiny:style" in err.message


def test_native_params_take_lora_per_request_only():
    assert check_params({"lora": ["style"]}, request=True) == {"lora": ["style"]}
    assert refusal(check_params, {"lora": "style"}).param == "params.lora"
    assert refusal(check_params, {"lora": 3}, request=True).param == "params.lora"


# -- over HTTP, with the fake engine (its output moves with the adapter set) ------------------
SETTINGS = EngineSettings(loras=SPECS)
HALF_SET = (("/lora/style.gguf", 0.5),)
PROMPT = "hello"


def expected(n: int, adapters: tuple[tuple[str, float], ...] = ()) -> str:
    tokens = FakeModel().tokenize(PROMPT)
    out: list[int] = []
    for _ in range(n):
        last = (tokens + out)[-1]
        out.append(next_token(last, len(tokens) + len(out) - 1 + adapter_shift(adapters)))
    return "".join(f"<{t}>" for t in out)


def completion(c, **body) -> str:  # type: ignore[no-untyped-def]
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                        "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_openai_model_names_and_lora_field_choose_the_adapter():
    with client(FakeRunner(), SETTINGS) as c:
        style = (("/lora/style.gguf", 1.0),)
        assert completion(c) == expected(4)
        assert completion(c, model="tiny:style") == completion(c, lora="style") == \
            expected(4, style) != expected(4)
        assert completion(c, model="tiny:half") == completion(
            c, lora=[{"name": "style", "scale": 0.5}]) == expected(4, HALF_SET)
        c.app.state.registry.get("tiny").model.info.n_vocab = VOCAB  # the card reads it
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["tiny:style"]["parent"] == "tiny" and \
            models["tiny:style"]["root"] == "/lora/style.gguf"
        assert "parent" not in models["tiny"]
        assert c.get("/v1/models/tiny:half").json()["lora"] == {"alias": "half", "scale": 0.5}
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "lora": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
        r = c.post("/v1/chat/completions", json={"model": "tiny:nope",
                                                 "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/completions", json={"model": "tiny:style", "lora": "half",
                                            "prompt": PROMPT})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
        metrics = c.get("/metrics").text
        assert 'lmserve_adapter_steps_total{adapters="style",model="tiny"}' in metrics


def test_sglang_ollama_anthropic_and_native_choose_adapters_too():
    style = (("/lora/style.gguf", 1.0),)
    with client(FakeRunner(), SETTINGS) as c:
        batch = c.post("/generate", json={"text": [PROMPT, PROMPT], "lora_path": ["style", None],
                                          "sampling_params": {"max_new_tokens": 4}}).json()
        assert [b["text"] for b in batch] == [expected(4, style), expected(4)]
        r = c.post("/generate", json={"text": PROMPT, "lora_path": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        r = c.post("/api/generate", json={"model": "tiny:style", "prompt": PROMPT, "raw": True,
                                          "stream": False, "options": {"num_predict": 4}})
        assert r.json()["response"] == expected(4, style)
        r = c.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                   json={"model": "tiny:nope", "max_tokens": 4,
                         "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        native = c.post("/models/tiny/query/", json={
            "transport": "raw", "prompt": PROMPT,
            "params": {"max_tokens": 4, "temperature": 0, "lora": "style"}})
        assert native.json()["blocks"][0]["text"] == expected(4, style)
        r = c.put("/models/tiny/", json={"params": {"lora": "style"}})
        assert r.status_code == 400
