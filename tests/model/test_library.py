"""The model library with real files: a models directory (SmolLM2 by a symlink, a copy and a
hard link of the copy, Gemma 3 270M when assembled, a corrupt file, a truncated one, a shard
pair, a vision projector), a fake Hugging Face hub cache and a fake Ollama store laid out as
those tools lay them out. Listing from headers, load on demand in each dialect, concurrent
first requests, keep-alive, keep_alive 0, memory freed by an unload, LRU eviction under
--max-loaded 1 with a request running, admin routes with and without keys."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import have_gemma
from tests.model.conftest import Server, start_server, stop_server
from tests.unit.models.test_library import make_hf_cache, make_ollama_store, tiny_gguf

LIB = ["--ctx", "512", "--parallel", "2", "--threads", "2"]
CHAT = [{"role": "user", "content": "Say hi."}]
DEADLINE = 120.0  # generous: a busy 2-core CI machine
ROOT = Path(__file__).resolve().parents[2]


def build_library(root: Path, model_path: str) -> Path:
    lib = root / "models"
    lib.mkdir()
    os.symlink(model_path, lib / "alpha.gguf")
    shutil.copyfile(model_path, lib / "beta.gguf")
    os.link(lib / "beta.gguf", lib / "gamma.gguf")  # another name: a model of its own
    if have_gemma():
        from lmserve.models.resolve import resolve
        os.symlink(resolve("gemma3-270m").path, lib / "gemma.gguf")
    (lib / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with open(model_path, "rb") as src:
        (lib / "trunc.gguf").write_bytes(src.read(4 << 20))
    tiny_gguf(lib / "pair-00001-of-00002.gguf", extra={"split.no": 0, "split.count": 2})
    tiny_gguf(lib / "pair-00002-of-00002.gguf", extra={"split.no": 1, "split.count": 2})
    # a vision projector is not a model (in a folder of its own: a projector beside a model
    # file is loaded with it)
    tiny_gguf(lib / "projectors" / "mmproj-alpha-f16.gguf")
    # a real projector in a model's folder of its own; one beside every other model (a stray:
    # it names none of them); one made for another model's width (the model serves text)
    # (hard links: files of their own, where a symlink would be another name of alpha's file)
    os.link(lib / "beta.gguf", projector(lib / "seeing" / "mmproj-F16.gguf").parent /
            "seeing.gguf")
    shutil.copyfile(lib / "seeing" / "mmproj-F16.gguf", lib / "mmproj-F16.gguf")
    os.link(lib / "beta.gguf", projector(lib / "odd" / "mmproj-odd.gguf", n_embd=64).parent /
            "odd.gguf")
    (lib / "notes.txt").write_text("not a model")
    return lib


def projector(path: Path, n_embd: int = 576) -> Path:
    """A tiny random vision projector (scripts/make_test_mmproj.py) for SmolLM2's width."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_mmproj.py"), str(path),
                    "--n-embd", str(n_embd)], check=True, capture_output=True)
    return path


def start_library(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return start_server(str(tmp), *args, "--store", "memory", *LIB)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("library")
    lib = build_library(tmp, model_path)
    hub = tmp / "hub"
    blob = tmp / "blob.gguf"
    os.link(lib / "beta.gguf", blob)
    make_hf_cache(hub, blob, repo="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                  filename="smollm2-135m-instruct-q4_1.gguf")
    make_ollama_store(tmp / "ollama", blob, params={"temperature": 0, "num_ctx": 512},
                      system="You are terse.")
    os.link(lib / "beta.gguf", tmp / "delta.gguf")
    settings = tmp / "library.toml"
    settings.write_text(f'[models.terse]\npath = "{tmp / "delta.gguf"}"\naliases = ["t"]\n'
                        'load = "demand"\nparams = {max_tokens = 3}\nparallel = 1\n')
    srv = start_library(tmp, "--config", str(settings), "--models-dir", str(lib),
                        "--discover", "hf,ollama", "--keep-alive", "3s",
                        env={"HF_HUB_CACHE": str(hub), "OLLAMA_MODELS": str(tmp / "ollama")})
    yield srv
    stop_server(srv)


def models(srv: Server, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{srv.url}/v1/models", headers=headers)
    return {m["id"]: m for m in r.json()["data"]}


def until(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def chat(srv: Server, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=DEADLINE,
                      json={"model": model, "messages": CHAT, "max_tokens": 4,
                            "temperature": 0, **extra})


def loaded(srv: Server) -> set[str]:
    return {m["name"] for m in httpx.get(f"{srv.url}/api/ps").json()["models"]}


def unload(srv: Server, name: str, headers: dict[str, str] | None = None) -> None:
    r = httpx.post(f"{srv.url}/admin/models/{name}/unload", headers=headers, timeout=DEADLINE)
    assert r.status_code in (200, 202), r.text
    until(lambda: models(srv, headers)[name]["status"] == "unloaded", f"{name} to unload")


# -- listing ---------------------------------------------------------------------------------

def test_everything_found_is_listed_unloaded_from_headers(library: Server) -> None:
    listed = models(library)
    hf = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q4_1"
    expected = {"alpha", "beta", "gamma", "corrupt", "trunc", "pair", hf,
                "smollm2-135m-instruct-q4_1", "smollm2:135m"}
    assert expected <= set(listed)
    assert not any("mmproj" in name or "notes" in name for name in listed)
    for name in ("alpha", "beta", "pair", hf, "smollm2:135m"):
        assert listed[name]["status"] == "unloaded", listed[name]
    assert listed["alpha"]["meta"]["architecture"] == "llama"
    assert listed["alpha"]["meta"]["n_ctx_train"] == 8192
    assert listed["corrupt"]["status"] == "failed" and "GGUF" in listed["corrupt"]["error"]
    assert listed["trunc"]["status"] == "failed" and "truncated" in listed["trunc"]["error"]
    tags = {m["name"] for m in httpx.get(f"{library.url}/api/tags").json()["models"]}
    assert expected <= tags
    anthropic = httpx.get(f"{library.url}/v1/models",
                          headers={"anthropic-version": "2023-06-01"}).json()["data"]
    assert expected <= {m["id"] for m in anthropic}
    plan = httpx.post(f"{library.url}/v1/plan", json={"runtime": {"model_reference": "beta"}})
    assert plan.status_code == 200, plan.text
    assert "unloaded" == models(library)["beta"]["status"]  # planning loads nothing


def test_a_model_that_cannot_load_answers_in_each_dialect(library: Server) -> None:
    r = chat(library, "corrupt")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    assert "not a GGUF" in r.json()["error"]["message"] or "GGUF" in r.json()["error"]["message"]
    r = httpx.post(f"{library.url}/v1/messages", headers={"anthropic-version": "2023-06-01"},
                   json={"model": "trunc", "max_tokens": 4, "messages": CHAT})
    assert r.status_code == 503 and r.json()["type"] == "error"
    assert "truncated" in r.json()["error"]["message"]
    r = httpx.post(f"{library.url}/api/chat", json={"model": "corrupt", "messages": CHAT})
    assert r.status_code == 503 and "could not be loaded" in r.json()["error"]
    assert httpx.get(f"{library.url}/health").status_code == 200


# -- load on demand ----------------------------------------------------------------------------

def test_load_on_demand_in_each_dialect(library: Server) -> None:
    r = chat(library, "alpha", keep_alive=0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    r = httpx.post(f"{library.url}/v1/messages", headers={"anthropic-version": "2023-06-01"},
                   timeout=DEADLINE, json={"model": "beta", "max_tokens": 4, "messages": CHAT,
                                           "keep_alive": 0})
    assert r.status_code == 200 and r.json()["content"][0]["text"], r.text
    r = httpx.post(f"{library.url}/api/chat", timeout=DEADLINE,
                   json={"model": "smollm2:135m", "messages": CHAT, "stream": False,
                         "options": {"num_predict": 4}, "keep_alive": 0})
    assert r.status_code == 200 and r.json()["message"]["content"], r.text
    hf = "smollm2-135m-instruct-q4_1"  # the short name of the hub cache's file
    r = httpx.post(f"{library.url}/v1/completions", timeout=DEADLINE,
                   json={"model": hf, "prompt": "Once upon a", "max_tokens": 4,
                         "keep_alive": "0s"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    # keep_alive 0: each unloads once its request ended
    until(lambda: not loaded(library) & {"alpha", "beta", "smollm2:135m"}, "the unloads")


def test_concurrent_first_requests_share_one_load(library: Server) -> None:
    assert models(library)["gamma"]["status"] == "unloaded"
    results: list[int] = []

    def ask() -> None:
        results.append(chat(library, "gamma").status_code)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert len(re.findall(r"loading model gamma on demand", library.log())) == 1


def ws_events(ws: ClientConnection) -> list[dict[str, Any]]:
    """The events of one response.create, up to its last."""
    events = [json.loads(ws.recv(timeout=DEADLINE))]
    while events[-1]["type"] not in ("error", "response.completed", "response.incomplete",
                                     "response.failed"):
        events.append(json.loads(ws.recv(timeout=DEADLINE)))
    return events


def test_a_websocket_turn_waits_for_its_models_load(library: Server) -> None:
    unload(library, "beta")
    url = library.url.replace("http://", "ws://") + "/v1/responses"
    ask = {"type": "response.create", "model": "beta", "input": "Say hi.",
           "max_output_tokens": 4, "keep_alive": 0}
    with connect(url) as first, connect(url) as second:
        first.send(json.dumps(ask))  # both connections ask while beta is not loaded
        second.send(json.dumps(ask))
        for ws in (first, second):
            events = ws_events(ws)
            assert events[0]["type"] == "response.created", events
            assert events[-1]["type"] in ("response.completed", "response.incomplete"), events
            assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        # a load that fails (a header llama.cpp cannot load a model from): an error event in
        # the WebSocket's shape, and the connection goes on
        first.send(json.dumps({**ask, "model": "pair"}))
        error = ws_events(first)
        assert error == [{"type": "error", "status": 503, "error": error[0]["error"],
                          "request_id": first.response.headers["X-Request-Id"]}]
        assert error[0]["error"]["code"] == "model_load_failed", error
        assert "could not be loaded" in error[0]["error"]["message"]
        first.send(json.dumps(ask))
        assert ws_events(first)[-1]["type"] in ("response.completed", "response.incomplete")
    assert models(library)["pair"]["status"] == "failed"
    assert httpx.get(f"{library.url}/health").status_code == 200


def test_a_projector_is_attached_only_where_it_belongs(library: Server) -> None:
    for name in ("seeing", "odd", "alpha"):
        r = chat(library, name, keep_alive=-1)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    listed = models(library)
    assert listed["seeing"]["meta"]["vision"] is True  # the projector of its own folder
    assert listed["alpha"]["meta"]["vision"] is False  # the stray beside it is not its
    assert listed["odd"]["meta"]["vision"] is False  # made for another width: text only
    with open(library.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "model odd: the projector found for it is not used" in log
    assert re.search(r"vision projector \S*/models/mmproj-F16\.gguf is attached to no model",
                     log)
    for name in ("seeing", "odd", "alpha"):
        unload(library, name)


# -- keep-alive ----------------------------------------------------------------------------

def test_keep_alive_expiry_and_ps(library: Server) -> None:
    assert chat(library, "beta").status_code == 200
    entry = {m["name"]: m for m in httpx.get(f"{library.url}/api/ps").json()["models"]}["beta"]
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    now = datetime.now(UTC)
    assert now.timestamp() - 5 < expires.timestamp() < now.timestamp() + 60  # --keep-alive 3s
    assert entry["size"] > 90_000_000 and entry["size_vram"] == 0
    until(lambda: "beta" not in loaded(library), "the keep-alive to expire")
    assert models(library)["beta"]["status"] == "unloaded"


def test_ollama_keep_alive_load_forever_then_unload_now(library: Server) -> None:
    r = httpx.post(f"{library.url}/api/generate", timeout=DEADLINE,
                   json={"model": "alpha", "prompt": "", "keep_alive": -1})
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    ps = {m["name"]: m for m in httpx.get(f"{library.url}/api/ps").json()["models"]}
    assert ps["alpha"]["expires_at"].startswith("9999")  # never
    r = httpx.post(f"{library.url}/api/generate", timeout=DEADLINE,
                   json={"model": "alpha", "prompt": "", "keep_alive": 0})
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert "alpha" not in loaded(library)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_unload_frees_the_models_memory(library: Server) -> None:
    unloaded_rss = rss(library.proc.pid)
    r = httpx.post(f"{library.url}/api/generate", timeout=DEADLINE,
                   json={"model": "gamma", "prompt": "Hello", "keep_alive": -1, "stream": False,
                         "options": {"num_predict": 2}})
    assert r.status_code == 200, r.text
    loaded_rss = rss(library.proc.pid)
    unload(library, "gamma")
    after = rss(library.proc.pid)
    # The weights are 94 MiB (mapped and read), the KV cache of 512 cells x 4 slots 45 MiB.
    print(f"RSS unloaded {unloaded_rss >> 20} MiB, loaded {loaded_rss >> 20} MiB, "
          f"after unload {after >> 20} MiB")
    assert loaded_rss - after > 60 << 20


def test_stored_response_survives_unload_and_reload(library: Server) -> None:
    first = httpx.post(f"{library.url}/v1/responses", timeout=DEADLINE,
                       json={"model": "alpha", "input": "My name is Ada.", "max_output_tokens": 4,
                             "store": True, "keep_alive": -1})
    assert first.status_code == 200, first.text
    unload(library, "alpha")
    second = httpx.post(f"{library.url}/v1/responses", timeout=DEADLINE,
                        json={"model": "alpha", "input": "What is my name?",
                              "max_output_tokens": 4, "previous_response_id": first.json()["id"]})
    assert second.status_code == 200, second.text
    items = httpx.get(f"{library.url}/v1/responses/{second.json()['id']}/input_items").json()
    assert "Ada" in json.dumps(items)


def test_a_models_section_and_ollamas_layers_give_defaults(library: Server) -> None:
    assert models(library)["t"]["status"] == "unloaded"  # load = "demand"
    r = httpx.post(f"{library.url}/v1/chat/completions", timeout=DEADLINE,
                   json={"model": "terse", "messages": CHAT, "ignore_eos": True,
                         "keep_alive": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3  # the section's max_tokens
    assert r.json()["choices"][0]["finish_reason"] == "length"

    def prompt_tokens(model: str) -> int:
        r = httpx.post(f"{library.url}/api/chat", timeout=DEADLINE,
                       json={"model": model, "messages": CHAT, "stream": False,
                             "options": {"num_predict": 1}, "keep_alive": 0})
        assert r.status_code == 200, r.text
        return int(r.json()["prompt_eval_count"])

    # the same file; Ollama's system layer ("You are terse.") replaces the template's default
    assert prompt_tokens("smollm2:135m") != prompt_tokens("beta")


def test_the_disk_cache_and_sessions_work_across_unload_and_reload(tmp_path: Path,
                                                                    model_path: str) -> None:
    lib = tmp_path / "models"
    lib.mkdir()
    os.symlink(model_path, lib / "alpha.gguf")
    srv = start_library(tmp_path, "--models-dir", str(lib), "--data-dir", str(tmp_path),
                        "--disk-cache", str(tmp_path / "states"),
                        "--disk-cache-min-tokens", "64")
    prompt = " ".join(f"Ship {i} brought {i * 7 % 31} crates of tea to the north pier."
                      for i in range(20))  # about 330 tokens

    def cached_tokens() -> int:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=DEADLINE,
                       json={"model": "alpha", "prompt": prompt, "max_tokens": 2,
                             "keep_alive": -1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 64
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    try:
        assert cached_tokens() == 0
        until(lambda: srv.metric("lmserve_disk_cache_saves_total") >= 1, "the state's save")
        unload(srv, "alpha")
        assert cached_tokens() >= 64  # the reloaded model found the saved state
        assert srv.metric("lmserve_disk_cache_hits_total") == 1
        # an SGLang session goes on after its model was unloaded (its turns are stored)
        sid = httpx.post(f"{srv.url}/open_session", json={"capacity_of_str_len": 1000}).json()
        greedy = {"temperature": 0, "max_new_tokens": 3}
        first = httpx.post(f"{srv.url}/generate", timeout=DEADLINE, json={
            "model": "alpha", "text": "Once upon a time", "session_params": {"id": sid},
            "sampling_params": greedy}).json()["meta_info"]
        unload(srv, "alpha")
        r = httpx.post(f"{srv.url}/generate", timeout=DEADLINE, json={
            "model": "alpha", "text": " the king", "session_params": {"id": sid,
                                                                      "rid": first["id"]},
            "sampling_params": greedy})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["prompt_tokens"] > first["prompt_tokens"] + \
            first["completion_tokens"]  # the earlier turn is part of the prompt
    finally:
        stop_server(srv)


# -- admin routes ---------------------------------------------------------------------------

def test_admin_load_unload_reload_without_keys(library: Server) -> None:
    r = httpx.post(f"{library.url}/admin/models/beta/load", timeout=DEADLINE)
    assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
    r = httpx.post(f"{library.url}/admin/models/beta/reload", timeout=DEADLINE)
    assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
    r = httpx.post(f"{library.url}/admin/models/beta/unload", timeout=DEADLINE)
    assert r.status_code == 200 and r.json()["status"] == "unloaded", r.text
    listing = httpx.get(f"{library.url}/admin/models").json()
    assert {m["id"]: m["status"] for m in listing["data"]}["corrupt"] == "failed"
    r = httpx.post(f"{library.url}/admin/models/nothing/load")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.gemma
def test_gemma_loads_on_demand_beside_smollm2(library: Server) -> None:
    r = httpx.post(f"{library.url}/v1/completions", timeout=DEADLINE,
                   json={"model": "gemma", "prompt": "Once upon a", "max_tokens": 4,
                         "keep_alive": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    until(lambda: "gemma" not in loaded(library), "gemma to unload")


# -- limits and keys: a server of its own -----------------------------------------------------

@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("one")
    lib = build_library(tmp, model_path)
    srv = start_library(tmp, "--models-dir", str(lib), "--max-loaded", "1", "--keep-alive",
                        "1h", "--api-key", "user-key", "--admin-key", "admin-key")
    yield srv
    stop_server(srv)


USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}


def test_lru_eviction_waits_for_the_running_request(one_at_a_time: Server) -> None:
    srv = one_at_a_time
    events: list[str] = []
    first_token = threading.Event()

    def stream_alpha() -> None:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", headers=USER,
                          timeout=DEADLINE,
                          json={"model": "alpha", "messages": CHAT, "max_tokens": 24,
                                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content"' in line:
                    first_token.set()
        events.append("alpha done")

    def ask_beta() -> None:
        r = httpx.post(f"{srv.url}/v1/chat/completions", headers=USER, timeout=DEADLINE,
                       json={"model": "beta", "messages": CHAT, "max_tokens": 2})
        events.append(f"beta {r.status_code}")

    alpha = threading.Thread(target=stream_alpha)
    alpha.start()
    assert first_token.wait(DEADLINE)
    beta = threading.Thread(target=ask_beta)
    beta.start()
    alpha.join()
    beta.join()
    assert events == ["alpha done", "beta 200"]
    listed = models(srv, USER)
    assert listed["beta"]["status"] == "loaded" and listed["alpha"]["status"] == "unloaded"
    assert "model alpha unloaded (1 model(s) loaded (--max-loaded 1); making room for beta)" \
        in srv.log()


def test_admin_routes_need_the_admin_key(one_at_a_time: Server) -> None:
    url = f"{one_at_a_time.url}/admin/models/gamma/load"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers=USER).status_code == 403
    r = httpx.post(url, headers=ADMIN, timeout=DEADLINE)
    assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
    unload(one_at_a_time, "gamma", ADMIN)
