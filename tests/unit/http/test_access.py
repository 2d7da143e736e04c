"""Access and limits: key files and their reload, the rate limiter over an injected clock,
per-request token limits, admin routes, the body limit and CORS, each refusal in the caller's
dialect. The model tests (tests/model/test_access.py) run the same against `lmserve serve`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve import cli, config
from lmserve.core.backend import ChoiceStep, Finished, FinishReason
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import Usage
from lmserve.core.quota import (
    METER,
    Meter,
    MeteredGeneration,
    RateLimited,
    TokenLimits,
    charge_tokens,
)
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.dialects.anthropic import encoder as anthropic_encoder
from lmserve.dialects.native import encoder as native_encoder
from lmserve.dialects.ollama import encoder as ollama_encoder
from lmserve.dialects.ollm import encoder as ollm_encoder
from lmserve.dialects.openai import encoder as openai_encoder
from lmserve.dialects.sglang import encoder as sglang_encoder
from lmserve.dialects.sglang.routes import LiveRequests
from lmserve.http.access import AccessSettings
from lmserve.http.app import StoreSettings, create_app
from lmserve.http.keys import KeyPolicy, KeyRing, default_name, parse_key_file, parse_line
from lmserve.http.limits import RateLimiter
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings
from lmserve.stores.counters import MemoryCounters
from tests.unit.fakes import FakeRunner
from tests.unit.dialects.ollama.test_ollama import make_ready

SECRET = "sk-very-secret-0123456789"


class Clock:
    def __init__(self, now: float = 1_699_999_990.0) -> None:  # 10 s into a minute
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- key files ------------------------------------------------------------------------------

def test_key_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# the team's keys\n\n"
                    f"{SECRET} name=ci rpm=60 tpm=1000  # CI\n"
                    "sk-ops name=ops admin\n"
                    "sk-plain max_tokens=16 max_prompt_tokens=100\n", encoding="utf-8")
    ci, ops, plain = parse_key_file(path)
    assert ci.policy == KeyPolicy("ci", rpm=60, tpm=1000) and ci.key == SECRET
    assert ops.policy == KeyPolicy("ops", admin=True)
    assert plain.policy == KeyPolicy(default_name("sk-plain"), max_tokens=16,
                                     max_prompt_tokens=100)
    assert default_name("sk-plain").startswith("key-") and len(default_name("sk-plain")) == 12
    assert SECRET not in repr(ci)  # the key never shows in a repr (logs, tracebacks)


@pytest.mark.parametrize("line, message", [
    (f"{SECRET} rpm=ten", "rpm must be a whole number"),
    (f"{SECRET} rpm=0", "rpm must be at least 1"),
    (f"{SECRET} colour=red", "unknown field 'colour'"),
    (f"{SECRET} adminn", "unknown field 'adminn'"),
    (f"{SECRET} tpm=5 tpm=6", "tpm is given twice"),
    ("name=ci", "put the key first"),
])
def test_a_bad_line_names_its_file_and_line_but_not_the_key(tmp_path: Path, line: str,
                                                            message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"sk-fine name=a\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        parse_key_file(path)
    assert f"{path}:2: " in str(caught.value) and message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_the_same_key_twice_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{SECRET} name=a\n{SECRET} name=b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: the same key as line 1") as caught:
        parse_key_file(path)
    assert SECRET not in str(caught.value)
    with pytest.raises(ValueError, match="cannot read the API key file"):
        parse_key_file(tmp_path / "absent")
    assert parse_line("   # only a comment", "f:1") is None


def test_reload_swaps_the_table_and_a_bad_file_keeps_the_old(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-one name=one\n", encoding="utf-8")
    ring = KeyRing(["sk-flag"], admin_keys=["sk-root"], key_file=path)
    old = ring.table
    assert old.match("sk-one") == KeyPolicy("one")
    root = old.match("sk-root")
    assert root is not None and root.admin
    assert old.match("sk-flag") == KeyPolicy(default_name("sk-flag"))
    assert old.match("sk-on") is None and old.match("") is None
    path.write_text(f"{SECRET} name=two rpm=5\n", encoding="utf-8")
    assert ring.reload()
    assert ring.table.match("sk-one") is None and ring.table.match(SECRET) == \
        KeyPolicy("two", rpm=5)
    assert ring.table.match("sk-flag") is not None  # flag keys stay
    assert old.match("sk-one") is not None  # a request holding the old table is unaffected
    path.write_text(f"{SECRET} rpm=lots\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="lmserve.keys"):
        assert not ring.reload()
    assert ring.table.match(SECRET) == KeyPolicy("two", rpm=5)
    assert "not reloaded" in caplog.text and SECRET not in caplog.text


def test_access_settings_come_from_the_file_the_environment_and_flags(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-a name=a\n", encoding="utf-8")
    env = config.from_env({"LMSERVE_ADMIN_KEY": "sk-r1, sk-r2",
                           "LMSERVE_API_KEY_FILE": str(keys), "LMSERVE_MAX_BODY_BYTES": "1M",
                           "LMSERVE_CORS_ORIGIN": "https://a,https://b"})
    cfg = config.build({"admin_keys": "sk-file", "max_output_tokens": 64,
                        "cors_origins": ["https://file"]}, env, {"max_prompt_tokens": 100})
    assert cfg.admin_keys == ("sk-r1", "sk-r2") and cfg.api_key_file == str(keys)
    assert cfg.max_body_bytes == 1024 * 1024 and cfg.cors_origins == ("https://a", "https://b")
    assert (cfg.max_output_tokens, cfg.max_prompt_tokens) == (64, 100)
    assert config.ServerConfig().max_body_bytes == 32 * 1024 * 1024
    for bad, message in [({"max_output_tokens": 0}, "at least 1"),
                         ({"ssl_keyfile": str(keys)}, "needs ssl_certfile"),
                         ({"ssl_certfile": str(tmp_path / "none.pem")}, "no such file"),
                         ({"api_key_file": str(tmp_path / "none")}, "no such file")]:
        with pytest.raises(ValueError, match=message):
            config.build(bad)


def test_serve_stops_at_a_bad_key_file_naming_the_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"sk-good name=a\n{SECRET} tpm=-3\n", encoding="utf-8")
    assert cli.main(["serve", "--api-key-file", str(keys), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{keys}:2: tpm must be at least 1" in err and SECRET not in err


# ---- the rate limiter -----------------------------------------------------------------------

async def test_requests_a_minute_over_fixed_windows() -> None:
    clock = Clock()
    limiter = RateLimiter(MemoryCounters(clock), clock)
    policy = KeyPolicy("ci", rpm=2)
    await limiter.admit(policy)
    await limiter.admit(policy)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(policy)
    error = caught.value
    assert error.kind is ErrorKind.RATE_LIMITED and error.kind.http_status == 429
    assert error.dimension == "requests" and error.retry_after == 50.0  # the minute's rest
    assert "'ci'" in error.message and "2 requests a minute" in error.message
    await limiter.admit(KeyPolicy("other", rpm=2))  # another name, its own counter
    await limiter.admit(KeyPolicy("free"))  # no limits: never counted
    clock.now += 50  # the next minute
    await limiter.admit(policy)
    assert limiter.refused == {("ci", "requests"): 1}


async def test_tokens_a_minute_refuse_new_requests_once_used_up() -> None:
    clock = Clock()
    limiter = RateLimiter(MemoryCounters(clock), clock)
    policy = KeyPolicy("ci", tpm=100)
    await limiter.admit(policy)
    charge = limiter.charger(policy)
    assert charge is not None and limiter.charger(KeyPolicy("x", rpm=3)) is None
    charge(60)
    await limiter.admit(policy)  # 60 < 100: still admitted (it may take the minute past)
    charge(60)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(policy)
    assert caught.value.dimension == "tokens"
    clock.now += 60
    await limiter.admit(policy)


def test_a_rate_limit_in_every_dialect() -> None:
    error = RateLimited("rate limit reached", "tokens", 7.0)
    assert openai_encoder.error_body(error)["error"] == {
        "message": "rate limit reached", "type": "tokens", "param": None,
        "code": "rate_limit_exceeded"}
    assert anthropic_encoder.error_body(error)["error"]["type"] == "rate_limit_error"
    assert ollama_encoder.error_body(error)["error"] == "rate limit reached"
    assert ollm_encoder.error_body(error)["detail"] == "rate limit reached"
    assert native_encoder.error_body(error)["error"]["type"] == "rate_limited"
    assert sglang_encoder.error_body(error)["error"]["code"] == 429
    for kind in (ErrorKind.PERMISSION, ErrorKind.PAYLOAD_TOO_LARGE, ErrorKind.RATE_LIMITED):
        assert anthropic_encoder.error_body(LmserveError(kind, "x"))["error"]["type"] in (
            "permission_error", "request_too_large", "rate_limit_error")


# ---- token limits -------------------------------------------------------------------------

def test_token_limits_refuse_naming_the_parameter_and_cap_an_unset_max_tokens() -> None:
    charged: list[int] = []
    meter = Meter(TokenLimits(max_prompt_tokens=10, max_tokens=5), charged.append)
    chat = GenerationRequest(messages=[ChatMessage("user", "hi")])
    assert meter.admit(chat, 4).max_tokens == 5 and charged == [4]
    with pytest.raises(LmserveError) as caught:
        meter.admit(GenerationRequest(prompt="x", max_tokens=6), 4)
    assert caught.value.param == "max_tokens" and caught.value.kind.http_status == 400
    with pytest.raises(LmserveError) as caught:
        meter.admit(chat, 11)
    assert caught.value.param == "messages" and "10" in caught.value.message
    assert TokenLimits(None, 8).tighter(TokenLimits(3, 9)) == TokenLimits(3, 8)


def test_embedding_inputs_are_charged_under_the_request_meter() -> None:
    charged: list[int] = []
    charge_tokens(5)  # no meter: nothing to charge
    token = METER.set(Meter(charge=charged.append))
    try:
        charge_tokens(7)
        charge_tokens(0)
    finally:
        METER.reset(token)
    assert charged == [7]


class Scripted:
    def __init__(self, steps: list[list[ChoiceStep]]) -> None:
        self.steps = steps
        self.closed = False

    request_id = "r"
    finished = False

    async def ready(self) -> None:
        pass

    async def __aiter__(self) -> Any:
        for step in self.steps:
            yield step

    def close(self) -> None:
        self.closed = True


async def test_output_tokens_are_charged_when_a_choice_ends_or_the_reader_leaves() -> None:
    done = Finished(FinishReason.STOP, Usage(prompt_tokens=3, completion_tokens=2))
    charged: list[int] = []
    steps = [[ChoiceStep(0, token_ids=[1]), ChoiceStep(1, token_ids=[5])],
             [ChoiceStep(0, token_ids=[2], end=done)], [ChoiceStep(1, token_ids=[6, 7])]]
    generation = MeteredGeneration(Scripted(steps), charged.append)  # type: ignore[arg-type]
    async for _ in generation:
        pass
    assert charged == [2, 3]  # choice 0 by its usage; choice 1 (never ended) by its tokens
    charged.clear()
    early = MeteredGeneration(Scripted(steps), charged.append)  # type: ignore[arg-type]
    async for _ in early:
        break
    early.close()
    assert charged == [2]


def test_live_requests_know_their_owner() -> None:
    live = LiveRequests()

    class Running:
        finished = False

    jobs: Any = [type("Job", (), {"rid": rid})() for rid in ("a", "b")]
    running: Any = [Running(), Running()]
    live.add(jobs, running, "alice")
    assert live.owner("a", "alice") is True and live.owner("a", "bob") is False
    assert live.owner("zzz", "bob") is None
    assert live.rids(owner="bob") == [] and sorted(live.rids(owner="alice")) == ["a", "b"]


# ---- over HTTP, in each dialect -------------------------------------------------------------

@contextlib.contextmanager
def app_client(access: AccessSettings, runner: FakeRunner | None = None,
               clock: Clock | None = None) -> Iterator[TestClient]:
    registry = ModelRegistry()
    service = registry.add("tiny", resolve("smollm2").path, EngineSettings())
    app = create_app(registry, load_on_startup=False, store=StoreSettings(url="memory"),
                     access=access)
    if clock is not None:  # the minute stands still: no window ends between two requests
        limiter = app.state.access.limiter
        limiter.clock, limiter.counters = clock, MemoryCounters(clock)
    with TestClient(app) as c:
        if runner is not None:
            c.portal.call(make_ready, service, runner)  # type: ignore[union-attr]
        yield c


def _ring(tmp_path: Path, text: str) -> KeyRing:
    path = tmp_path / "keys"
    path.write_text(text, encoding="utf-8")
    return KeyRing(key_file=path)


# (method, path, body, headers, how the dialect's error body reads)
DIALECTS: list[tuple[str, str, dict[str, Any], dict[str, str], Any]] = [
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": []}, {},
     lambda b: (b["error"]["type"], b["error"]["code"])),
    ("POST", "/v1/messages", {"model": "tiny", "max_tokens": 1, "messages": []},
     {"anthropic-version": "2023-06-01"}, lambda b: (b["type"], b["error"]["type"])),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, {},
     lambda b: isinstance(b["error"], str)),
    ("POST", "/models/tiny/query/", {"prompt": "hi"}, {}, lambda b: b["error"]["type"]),
    ("POST", "/generate", {"text": "hi"}, {}, lambda b: b["error"]["code"]),
    ("POST", "/v1/prompt", {"model": "tiny", "prompt": "hi"}, {},
     lambda b: isinstance(b["detail"], str)),
]
RATE_SHAPES = [("requests", "rate_limit_exceeded"), ("error", "rate_limit_error"), True,
               "rate_limited", 429, True]


@pytest.mark.parametrize("dialect", range(len(DIALECTS)))
def test_429_with_retry_after_in_each_dialect(tmp_path: Path, dialect: int) -> None:
    method, path, body, headers, shape = DIALECTS[dialect]
    ring = _ring(tmp_path, f"{SECRET} name=ci rpm=1\n")
    with app_client(AccessSettings(keys=ring), clock=Clock()) as c:
        auth = {**headers, "Authorization": f"Bearer {SECRET}"}
        first = c.request(method, path, json=body, headers=auth)
        assert first.status_code != 429  # the model is not loaded: 503, but it counted
        r = c.request(method, path, json=body, headers=auth)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "50"
        assert shape(r.json()) == RATE_SHAPES[dialect]
        assert SECRET not in r.text
        family = next(iter(c.app.state.access.collector().collect()))  # type: ignore[attr-defined]
        assert [(s.name, s.labels, s.value) for s in family.samples][0] == (
            "lmserve_rate_limited_requests_total", {"key": "ci", "limit": "requests"}, 1)
        assert SECRET not in c.get("/metrics").text


def test_tokens_a_minute_over_http(tmp_path: Path) -> None:
    ring = _ring(tmp_path, f"{SECRET} name=ci tpm=5\n")
    clock = Clock()
    with app_client(AccessSettings(keys=ring), FakeRunner(n_ctx=256), clock) as c:
        auth = {"Authorization": f"Bearer {SECRET}"}
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 3}
        assert c.post("/v1/completions", json=body, headers=auth).status_code == 200
        r = c.post("/v1/completions", json=body, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
        clock.now += 60
        assert c.post("/v1/completions", json=body, headers=auth).status_code == 200


def test_token_limits_over_http_server_wide_and_per_key(tmp_path: Path) -> None:
    ring = _ring(tmp_path, f"{SECRET} name=ci max_tokens=2\nsk-other name=other\n")
    access = AccessSettings(keys=ring, limits=TokenLimits(max_prompt_tokens=100, max_tokens=4))
    with app_client(access, FakeRunner(n_ctx=2048)) as c:
        mine, other = {"x-api-key": SECRET}, {"x-api-key": "sk-other"}
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
        r = c.post("/v1/completions", json=body, headers=mine)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert c.post("/v1/completions", json=body, headers=other).status_code == 200
        r = c.post("/v1/completions", json={**body, "max_tokens": 5}, headers=other)
        assert r.status_code == 400 and "allows 4" in r.json()["error"]["message"]
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        r = c.post("/v1/chat/completions", json=chat, headers=mine)  # no max_tokens: the limit
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
        long = {"model": "tiny", "prompt": "word " * 150, "max_tokens": 1}
        r = c.post("/api/generate", json={"model": "tiny", "prompt": "word " * 150,
                                          "stream": False}, headers=other)
        assert r.status_code == 400 and "allows 100" in r.json()["error"]
        r = c.post("/v1/completions", json=long, headers=other)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_admin_routes_need_an_admin_key(tmp_path: Path) -> None:
    ring = _ring(tmp_path, f"{SECRET} name=ci\nsk-root name=ops admin\n")
    with app_client(AccessSettings(keys=ring), FakeRunner(n_ctx=256)) as c:
        user, admin = {"x-api-key": SECRET}, {"x-api-key": "sk-root"}
        assert c.post("/flush_cache").status_code == 401
        r = c.post("/flush_cache", headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == 403
        assert c.post("/flush_cache", headers=admin).status_code == 200
        r = c.put("/models/tiny/", json={"params": {"temperature": 0}}, headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
        assert c.put("/models/tiny/", json={"params": {"temperature": 0}},
                     headers=admin).status_code == 200
        r = c.post("/abort_request", json={"abort_all": True}, headers=user)
        assert r.status_code == 200  # only the caller's own requests
        assert c.post("/abort_request", json={"rid": "nobody"}, headers=user).status_code == 200


def test_without_keys_the_admin_routes_are_open() -> None:
    with app_client(AccessSettings(), FakeRunner(n_ctx=256)) as c:
        assert c.post("/flush_cache").status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_the_limit_get_413_in_the_dialect(chunked: bool) -> None:
    with app_client(AccessSettings(max_body_bytes=200), FakeRunner(n_ctx=256)) as c:
        big = b'{"model": "tiny", "prompt": "' + b"x" * 400 + b'"}'

        def send(path: str) -> Any:
            if chunked:  # no Content-Length: counted while it arrives
                return c.post(path, content=iter([big[:100], big[100:]]),
                              headers={"content-type": "application/json"})
            return c.post(path, content=big, headers={"content-type": "application/json"})

        r = send("/v1/completions")
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "200 bytes" in r.json()["error"]["message"]
        r = send("/api/generate")
        assert r.status_code == 413 and isinstance(r.json()["error"], str)
        r = send("/v1/messages")
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        small = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
        assert c.post("/v1/completions", json=small).status_code == 200


def test_cors_is_off_by_default_and_answers_preflights_for_its_origins() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with app_client(AccessSettings()) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with app_client(AccessSettings(cors_origins=("https://app.example",))) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
