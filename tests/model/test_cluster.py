"""Two real `lmserve serve smollm2` replicas sharing one real redis-server (issue 18): native
streams, stored Responses, oLLM sessions and SGLang aborts cross replicas; a killed replica's
streams end with an error frame on the other replica's readers. No timing is asserted; every
wait has a generous deadline."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from benchmarks import reliability as rel
from lmserve.cluster import DEFAULT_ROUTER_ARGS, RouterProcess
from tests.model.conftest import Server, free_port, start_server, stop_server, wait_ready
from tests.model.sse import Frame, read_sse

P = "/models/smollm2/"
REPLICA = ("smollm2", "--threads", "1", "--parallel", "2", "--ctx", "1024")
LONG = {"prompt": "Write a very long story about a dragon, with many chapters.",
        "params": {"max_tokens": 600, "temperature": 1.0}}

pytestmark = pytest.mark.skipif(rel.redis_binary() is None,
                                reason="redis-server is not installed (apt-get install "
                                       "redis-server)")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rel.redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis: str) -> Iterator[list[Server]]:
    tmp = str(tmp_path_factory.mktemp("replicas"))
    started = [start_server(tmp, *REPLICA, "--store", redis, wait=False) for _ in range(2)]
    try:
        for server in started:
            wait_ready(server, timeout=300)  # two loads at once on a busy machine
        yield started
    finally:
        for server in started:
            stop_server(server)


@pytest.fixture()
def ab(replicas: list[Server]) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    with httpx.Client(base_url=replicas[0].url, timeout=120) as a, \
            httpx.Client(base_url=replicas[1].url, timeout=120) as b:
        yield a, b


def start_stream(client: httpx.Client, body: dict = LONG) -> str:
    r = client.post(f"{P}stream/", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def frames(client: httpx.Client, ident: str, timeout: float = 120) -> list[Frame]:
    return read_sse(client, f"{P}stream/{ident}/", timeout=timeout)[0]


def wait_until(check, timeout: float = 60.0, what: str = "the condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def test_a_stream_started_on_a_is_read_and_resumed_on_b_and_cancelled_from_b(ab, replicas):
    a, b = ab
    ident = start_stream(a)
    wait_until(lambda: replicas[0].metric("lmserve_generated_tokens_total") > 0,
               what="generation")
    # B reads the frames A writes, and resumes after a Last-Event-ID.
    resumed, _ = read_sse(b, f"{P}stream/{ident}/", last_event_id=2, stop_after=3)
    assert [f.id for f in resumed] == [3, 4, 5]
    # DELETE on B: the cancel reaches A's engine through Redis.
    r = b.delete(f"{P}stream/{ident}/")
    assert r.status_code == 200 and r.json() == {"id": ident, "cancelled": True}, r.text
    got = frames(b, ident)
    assert got[-1].event == "message.stop" and got[-1].data["stop_reason"] == "cancelled"
    assert got[-1].data["usage"]["output_tokens"] < 600
    replicas[0].assert_generation_stops()
    # The whole stream read on A matches B's, frame for frame.
    assert [(f.id, f.event) for f in frames(a, ident)] == [(f.id, f.event) for f in got]
    assert b.delete(f"{P}stream/{ident}/").json() == {"id": ident, "cancelled": False}


def test_stored_responses_cross_replicas(ab):
    a, b = ab
    first = a.post("/v1/responses", json={"model": "smollm2", "input": "My name is Ada.",
                                          "max_output_tokens": 8, "temperature": 0})
    assert first.status_code == 200, first.text
    rid = first.json()["id"]
    got = b.get(f"/v1/responses/{rid}")
    assert got.status_code == 200 and got.json()["id"] == rid
    items = b.get(f"/v1/responses/{rid}/input_items").json()
    assert "Ada" in json.dumps(items["data"])
    second = b.post("/v1/responses", json={"model": "smollm2", "input": "What is my name?",
                                           "previous_response_id": rid,
                                           "max_output_tokens": 8, "temperature": 0})
    assert second.status_code == 200, second.text
    # B's turn was rendered after A's: the prompt holds the first turn.
    assert second.json()["usage"]["input_tokens"] > first.json()["usage"]["input_tokens"]
    assert a.get(f"/v1/responses/{second.json()['id']}").json()["previous_response_id"] == rid
    assert b.delete(f"/v1/responses/{rid}").json()["deleted"] is True
    assert a.get(f"/v1/responses/{rid}").status_code == 404


def test_a_websocket_chain_goes_on_on_another_replica(ab, replicas):
    a, b = ab
    kw = {"model": "smollm2", "max_output_tokens": 8, "temperature": 0}

    def ws_turn(server: Server, **fields: object) -> dict:
        with connect(server.url.replace("http://", "ws://") + "/v1/responses") as ws:
            ws.send(json.dumps({"type": "response.create", **kw, **fields}))
            while True:
                event = json.loads(ws.recv(timeout=120))
                if event["type"] in ("error", "response.completed", "response.incomplete",
                                     "response.failed"):
                    assert event["type"] != "error", event
                    return dict(event["response"])

    first = ws_turn(replicas[0], input="My name is Ada.")
    second = ws_turn(replicas[1], input="What is my name?", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"]
    third = a.post("/v1/responses", json={**kw, "input": "Thanks.",
                                          "previous_response_id": second["id"]})
    assert third.status_code == 200, third.text
    items = b.get(f"/v1/responses/{third.json()['id']}/input_items").json()["data"]
    assert len(items) == 5  # three inputs and two answers, gathered across both replicas


def test_an_ollm_session_goes_on_on_another_replica(ab):
    a, b = ab
    sid = a.post("/v1/sessions", json={"generation": {"temperature": 0, "max_new_tokens": 6},
                                       "system_prompt": "You are terse."}).json()["session_id"]
    assert a.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "Hi."}).status_code == 200
    r = b.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "Again."})
    assert r.status_code == 200, r.text
    transcript = a.get(f"/v1/sessions/{sid}").json()
    assert transcript["message_count"] == 4
    assert b.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    assert a.get(f"/v1/sessions/{sid}").status_code == 404


def test_sglang_abort_request_on_b_aborts_the_rid_running_on_a(ab, replicas):
    a, b = ab
    rid = uuid.uuid4().hex
    result: dict = {}

    def generate() -> None:
        r = a.post("/generate", json={"text": "Once upon a time", "rid": rid,
                                      "sampling_params": {"max_new_tokens": 600,
                                                          "ignore_eos": True}})
        result["body"] = r.json()

    thread = threading.Thread(target=generate)
    thread.start()
    wait_until(lambda: replicas[0].metric("lmserve_requests_running") > 0, what="generation")
    assert b.post("/abort_request", json={"rid": rid}).status_code == 200
    thread.join(120)
    meta = result["body"]["meta_info"]
    assert meta["id"] == rid and meta["finish_reason"]["type"] == "abort", meta
    assert meta["completion_tokens"] < 600


def test_a_killed_replicas_stream_ends_with_an_error_on_the_other(
        tmp_path: Path, redis: str, replicas: list[Server]) -> None:
    doomed = start_server(str(tmp_path), *REPLICA, "--store", redis)
    try:
        with httpx.Client(base_url=doomed.url, timeout=120) as c:
            ident = start_stream(c)
            wait_until(lambda: doomed.metric("lmserve_generated_tokens_total") > 0,
                       what="generation")
        doomed.proc.kill()
        doomed.proc.wait(30)
        with httpx.Client(base_url=replicas[1].url, timeout=120) as b:
            got = frames(b, ident, timeout=90)  # the lease (15 s) runs out, the reader ends it
        assert got[-2].event == "error" and got[-1].event == "message.stop", got[-3:]
        assert "stopped" in got[-2].data["message"]
    finally:
        stop_server(doomed)


# --- sglang-router in front of the replicas -------------------------------------------------

ROUTER_ARGS = DEFAULT_ROUTER_ARGS  # cache_aware, balanced over two replicas


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, replicas: list[Server]) -> Iterator[str]:
    pytest.importorskip("sglang_router", reason="sglang-router is not installed (dev extras)")
    log_dir = tmp_path_factory.mktemp("router")
    proc = rel_router(log_dir, [s.url for s in replicas], ROUTER_ARGS)
    try:
        yield proc.url
    finally:
        proc.stop()


def rel_router(log_dir: Path, workers: list[str], args: tuple[str, ...]) -> RouterProcess:
    router = RouterProcess(workers, args=args, log_path=log_dir / "router.log")
    router.start()
    router.wait_ready(timeout=120)
    return router


def generated(replicas: list[Server]) -> list[float]:
    return [s.metric("lmserve_generated_tokens_total") for s in replicas]


def test_the_router_sees_the_replicas_as_workers_named_by_their_model(router: str) -> None:
    models = httpx.get(f"{router}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["smollm2"], models


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}],
                              "max_tokens": 4}),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 4}),
    ("/generate", {"text": "The sky is", "sampling_params": {"max_new_tokens": 4}}),
])
def test_the_router_forwards_openai_and_sglang_generation(router: str, path: str,
                                                         body: dict) -> None:
    r = httpx.post(f"{router}{path}", json={"model": "smollm2", **body}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    text = out["text"] if path == "/generate" else (
        out["choices"][0].get("message", {}).get("content") or out["choices"][0].get("text"))
    assert isinstance(text, str)


def test_cache_aware_routing_spreads_concurrent_conversations_over_both_replicas(
        router: str, replicas: list[Server]) -> None:
    # One after another, every conversation would go where the shared template prefix is
    # cached; eight at once pass the balance thresholds, so the other replica takes some.
    def ask(i: int) -> int:
        return httpx.post(f"{router}/v1/chat/completions", timeout=300, json={
            "model": "smollm2", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": f"Conversation {i}: tell a story."}],
        }).status_code

    before = generated(replicas)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(ask, range(24)))
    assert statuses == [200] * 24
    after = generated(replicas)
    assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)


# --- lmserve cluster ------------------------------------------------------------------------

CLUSTER_SERVE_ARGS = ("--parallel", "2", "--ctx", "1024")


def test_lmserve_cluster_starts_redis_replicas_and_router_and_stops_them_on_sigterm(
        tmp_path: Path) -> None:
    pytest.importorskip("sglang_router", reason="sglang-router is not installed (dev extras)")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmserve", "cluster", "--replicas", "2", "smollm2", "--threads",
         "1", "--port", str(port), "--workdir", str(tmp_path),
         "--serve-args", " ".join(CLUSTER_SERVE_ARGS)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "ready." in line or "exited" in line:
                break
        ready = lines[-1]
        assert "ready." in ready, "".join(lines)
        urls = re.findall(r"http://[\d.:]+", ready)
        router, replicas = urls[0], urls[1:]
        assert router == f"http://127.0.0.1:{port}" and len(replicas) == 2
        store = re.search(r"store (redis://\S+)", ready)
        assert store is not None
        for _ in range(2):
            r = httpx.post(f"{router}/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "max_tokens": 4,
                "messages": [{"role": "user", "content": "Say hi."}]})
            assert r.status_code == 200, r.text
        for url in replicas:  # each runs with the thread count and serve arguments given
            info = httpx.get(f"{url}/server_info", timeout=30).json()
            engine = info["models"][0]["engine"]
            assert (engine["threads"], engine["parallel"], engine["n_ctx"]) == (1, 2, 1024)
            assert info["store"]["url"] == store.group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        for url in [router, *replicas]:
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"{url}/health", timeout=5)
        redis_port = int(store.group(1).rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# --- failover and nginx ---------------------------------------------------------------------

def test_kill_9_of_a_replica_under_load_the_other_serves_and_it_rejoins(
        tmp_path: Path, redis: str, replicas: list[Server]) -> None:
    doomed = start_server(str(tmp_path), *REPLICA, "--store", redis)
    router = rel_router(tmp_path, [replicas[1].url, doomed.url],
                        (*DEFAULT_ROUTER_ARGS, "--health-check-interval-secs", "2",
                         "--health-failure-threshold", "1"))
    chat = {"model": "smollm2", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Tell me a story."}]}
    try:
        with httpx.Client(base_url=doomed.url, timeout=120) as c:
            ident = start_stream(c)  # in flight on the replica that dies
        with ThreadPoolExecutor(4) as pool:  # load on both replicas while it dies
            running = [pool.submit(httpx.post, f"{router.url}/v1/chat/completions", json=chat,
                                   timeout=300) for _ in range(8)]
            wait_until(lambda: doomed.metric("lmserve_generated_tokens_total") > 0,
                       what="generation on the doomed replica")
            doomed.proc.kill()
            doomed.proc.wait(30)
            during = [f.result().status_code for f in running]
        print("statuses while the replica died:", during)
        assert all(s in (200, 500, 502, 503) for s in during), during  # cut ones may fail
        after = [httpx.post(f"{router.url}/v1/chat/completions", json=chat,
                            timeout=300).status_code for _ in range(6)]
        assert after == [200] * 6  # the router retries elsewhere, then drops the dead worker
        with httpx.Client(base_url=replicas[1].url, timeout=120) as b:
            got = frames(b, ident, timeout=90)
        assert [f.event for f in got[-2:]] == ["error", "message.stop"], got[-3:]
        # Back on the same address, it rejoins: the router's health checks take it in again.
        port = doomed.url.rsplit(":", 1)[1]
        with open(tmp_path / "revived.log", "w") as log:
            doomed.proc = subprocess.Popen(
                [sys.executable, "-m", "lmserve", "serve", *REPLICA, "--store", redis,
                 "--port", port], stdout=log, stderr=subprocess.STDOUT)
        wait_ready(doomed, timeout=300)

        def revived_generates() -> bool:
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: httpx.post(
                    f"{router.url}/v1/chat/completions", json=chat, timeout=300).status_code,
                    range(8)))
            assert codes == [200] * 8, codes
            return doomed.metric("lmserve_generated_tokens_total") > 0

        wait_until(revived_generates, timeout=180, what="the revived replica taking requests")
    finally:
        router.stop()
        stop_server(doomed)


def test_nginx_sends_each_dialect_to_the_router_or_the_replicas(
        tmp_path: Path, router: str, replicas: list[Server]) -> None:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if nginx is None:
        pytest.skip("nginx is not installed (make system-deps installs nginx-light)")
    conf = (Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("server router:30000;", f"server {router.removeprefix('http://')};")
    for i, server in enumerate(replicas, 1):
        conf = conf.replace(f"server replica-{i}:8000", f"server {server.url[7:]}")
    port = free_port()
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};\n        access_log off;")
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-g", f"daemon off; pid {tmp_path}/nginx.pid; "
                                   f"error_log {tmp_path}/error.log;"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/health"), timeout=30, what="nginx listening")
        chat = {"model": "smollm2", "max_tokens": 4,
                "messages": [{"role": "user", "content": "Say hi."}]}
        for path, body in [("/v1/chat/completions", chat), ("/v1/messages", chat),
                           ("/api/chat", {**chat, "stream": False,
                                          "options": {"num_predict": 4}}),
                           ("/generate", {"text": "Hi", "sampling_params":
                                          {"max_new_tokens": 4}})]:
            headers = {"anthropic-version": "2023-06-01"} if path == "/v1/messages" else {}
            r = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=120)
            assert r.status_code == 200, (path, r.text)
        with httpx.Client(base_url=base, timeout=120) as c:
            ident = start_stream(c, {"prompt": "Hi", "params": {"max_tokens": 4}})
            got = frames(c, ident)
        assert got[-1].event == "message.stop"
    finally:
        proc.terminate()
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
