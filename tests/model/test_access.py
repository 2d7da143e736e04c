"""Access and limits on a real `lmserve serve` over HTTPS: a key file with names, limits and an
admin key, reloaded on SIGHUP while a stream runs; a per-key rate limit; a chunked body over
--max-body-bytes; CORS; and no key string in /metrics, /server_info, /v1/plan or the log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.model.conftest import Server, free_port, stop_server

USER, LIMITED, ADMIN, NEW, OTHER = ("sk-user-3f9a1c77", "sk-limited-8b2d4e51",
                                    "sk-admin-51c0ffee", "sk-new-77aa12bc", "sk-other-0d9e4a2b")
KEYS = (f"{USER} name=user rpm=1000 tpm=1000000 max_tokens=16\n"
        f"{LIMITED} name=limited rpm=1\n"
        f"{ADMIN} name=ops admin\n"
        f"{OTHER} name=other\n")


def _certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made here (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    return cert, key


class TlsServer(Server):
    key_file: Path
    tls: ssl.SSLContext

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, verify=self.tls, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    tmp = tmp_path_factory.mktemp("access")
    cert, key = _certificate(tmp)
    key_file = tmp / "keys"
    key_file.write_text(KEYS, encoding="utf-8")
    port = free_port()
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmserve", "serve", "smollm2", "--port", str(port),
             "--parallel", "2", "--ctx", "1024", "--threads", "2", "--data-dir", str(tmp),
             "--api-key-file", str(key_file), "--ssl-certfile", str(cert), "--ssl-keyfile",
             str(key), "--max-body-bytes", "4096", "--cors-origin", "https://app.example",
             "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
    server = TlsServer(f"https://127.0.0.1:{port}", proc, str(log_path))
    server.key_file = key_file
    server.tls = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 180
    with server.client() as http:
        while True:
            assert proc.poll() is None, f"the server exited:\n{server.log()}"
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{server.log()}"
            time.sleep(0.2)
    yield server
    stop_server(server)


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 2, "temperature": 0}


def test_https_with_keys_and_their_limits(tls_server: TlsServer) -> None:
    with tls_server.client(USER) as http:
        r = http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 17})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    with tls_server.client() as anonymous:
        assert anonymous.post("/v1/chat/completions", json=CHAT).status_code == 401
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(tls_server.url.replace("https", "http") + "/health", timeout=10)


def test_a_key_over_its_requests_a_minute_gets_429(tls_server: TlsServer) -> None:
    with tls_server.client(LIMITED) as http, ThreadPoolExecutor(3) as pool:
        # rpm=1, counted when a request is admitted: three requests sent at once reach the
        # counter within moments, so they touch at most two minute windows and one at least
        # is refused however long the answers take on a loaded machine (one after another,
        # three slow answers could each fall in a minute of its own)
        answers = list(pool.map(lambda _: http.post("/api/chat", json={**CHAT, "stream": False}),
                                range(3)))
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers]
    r = refused[0]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "'limited'" in r.json()["error"] and LIMITED not in r.text


def test_admin_routes_and_cors(tls_server: TlsServer) -> None:
    with tls_server.client(USER) as http:
        assert http.post("/flush_cache").status_code == 403
        r = http.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
    with tls_server.client(ADMIN) as http:
        assert http.post("/flush_cache").status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(tls_server: TlsServer) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"model": "smollm2", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}], "max_tokens": 1}'

    with tls_server.client(USER) as http:
        r = http.post("/v1/chat/completions", content=body(),
                      headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.post("/v1/messages", content=b"{" + b" " * 5000 + b"}",
                      headers={"content-type": "application/json",
                               "anthropic-version": "2023-06-01"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


NATIVE = "/models/smollm2/"


def _stream_events(http: httpx.Client, ident: str) -> list[tuple[str, dict]]:
    events, name = [], ""
    with http.stream("GET", f"{NATIVE}stream/{ident}/") as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_only_the_key_that_started_a_native_stream_or_an_admin_may_cancel_it(
        tls_server: TlsServer) -> None:
    body = {"prompt": "Count to twenty.", "params": {"max_tokens": 12, "temperature": 0}}
    with tls_server.client(USER) as user, tls_server.client(OTHER) as other, \
            tls_server.client(ADMIN) as admin:
        ident = user.post(f"{NATIVE}stream/", json=body).json()["id"]
        refused = other.delete(f"{NATIVE}stream/{ident}/")
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["type"] == "permission" and error["code"] == "admin_key_required"
        assert error["param"] == "stream_id" and OTHER not in refused.text
        events = _stream_events(other, ident)  # any key reads it: the refusal cancelled nothing
        assert events[-1][0] == "message.stop"
        assert events[-1][1]["stop_reason"] in ("stop", "max_tokens"), events[-1]
        mine = user.delete(f"{NATIVE}stream/{ident}/")
        assert mine.status_code == 200 and mine.json() == {"id": ident, "cancelled": False}
        ident = other.post(f"{NATIVE}stream/", json=body).json()["id"]
        ops = admin.delete(f"{NATIVE}stream/{ident}/")
        assert ops.status_code == 200 and ops.json()["id"] == ident, ops.text


def test_only_the_key_that_stored_a_response_or_an_admin_may_delete_it(
        tls_server: TlsServer) -> None:
    body = {"model": "smollm2", "input": "Say hi.", "max_output_tokens": 2, "store": True}
    with tls_server.client(USER) as user, tls_server.client(OTHER) as other, \
            tls_server.client(ADMIN) as admin:
        ident = user.post("/v1/responses", json=body).json()["id"]
        refused = other.delete(f"/v1/responses/{ident}")
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "admin_key_required"
        assert error["param"] == "response_id"
        assert user.get(f"/v1/responses/{ident}").status_code == 200  # not deleted
        assert other.delete("/v1/responses/resp_unknown").status_code == 404
        mine = user.delete(f"/v1/responses/{ident}")
        assert mine.status_code == 200 and mine.json()["deleted"] is True, mine.text
        assert user.get(f"/v1/responses/{ident}").status_code == 404
        ident = other.post("/v1/responses", json=body).json()["id"]
        ops = admin.delete(f"/v1/responses/{ident}")
        assert ops.status_code == 200 and ops.json()["deleted"] is True, ops.text


def test_another_key_cannot_read_or_continue_a_stored_response(tls_server: TlsServer) -> None:
    """A stored response is its key's: another key gets the 404 of an unknown id (nothing
    says it exists) on GET, on its input items and as previous_response_id; an admin reads."""
    body = {"model": "smollm2", "input": "Say hi.", "max_output_tokens": 2, "store": True}
    with tls_server.client(USER) as user, tls_server.client(OTHER) as other, \
            tls_server.client(ADMIN) as admin:
        ident = user.post("/v1/responses", json=body).json()["id"]
        for path in (f"/v1/responses/{ident}", f"/v1/responses/{ident}/input_items"):
            hidden = other.get(path)
            assert hidden.status_code == 404, hidden.text
            assert hidden.json()["error"]["type"] == "invalid_request_error"
            assert user.get(path).status_code == 200 and admin.get(path).status_code == 200
        chained = other.post("/v1/responses", json={**body, "previous_response_id": ident})
        assert chained.status_code == 404, chained.text
        assert chained.json()["error"]["code"] == "previous_response_not_found"
        mine = user.post("/v1/responses", json={**body, "previous_response_id": ident})
        assert mine.status_code == 200, mine.text


def _works(server: TlsServer, key: str) -> bool:
    with server.client(key) as http:
        return http.get("/v1/models").status_code == 200


def _wait_for(condition, what: str, server: TlsServer) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{server.log()}"
        time.sleep(0.1)


def test_sighup_reloads_the_key_file_without_dropping_a_stream(tls_server: TlsServer) -> None:
    assert _works(tls_server, USER) and not _works(tls_server, NEW)
    with tls_server.client(USER) as http, http.stream(
            "POST", "/v1/chat/completions",
            json={**CHAT, "max_tokens": 16, "stream": True}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
        tls_server.key_file.write_text(KEYS.replace(USER, NEW), encoding="utf-8")
        os.kill(tls_server.proc.pid, signal.SIGHUP)
        _wait_for(lambda: _works(tls_server, NEW), "the new key never worked", tls_server)
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the stream under the old key ran to its end
    assert not _works(tls_server, USER)
    tls_server.key_file.write_text(f"{NEW} rpm=many\n", encoding="utf-8")  # a bad file
    os.kill(tls_server.proc.pid, signal.SIGHUP)
    _wait_for(lambda: "API keys not reloaded" in tls_server.log(), "no error logged",
              tls_server)
    assert _works(tls_server, NEW) and _works(tls_server, ADMIN)  # the old table stays
    tls_server.key_file.write_text(KEYS, encoding="utf-8")
    os.kill(tls_server.proc.pid, signal.SIGHUP)
    _wait_for(lambda: _works(tls_server, USER), "the keys were not restored", tls_server)


def test_no_key_appears_in_info_routes_metrics_or_the_log(tls_server: TlsServer) -> None:
    with tls_server.client(ADMIN) as http:
        http.post("/v1/chat/completions", json=CHAT)
        http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-guess"})
        texts = {"/metrics": http.get("/metrics").text,
                 "/server_info": http.get("/server_info").text,
                 "/v1/plan": http.post("/v1/plan", json={"model": "smollm2"}).text}
    info = json.loads(texts["/server_info"])
    assert set(info["api_key_names"]) >= {"user", "limited", "ops"}
    texts["log"] = Path(tls_server.log_path).read_text(encoding="utf-8", errors="replace")
    for where, text in texts.items():
        for key in (USER, LIMITED, ADMIN, NEW, OTHER, "sk-wrong-guess"):
            assert key not in text, f"{key} in {where}"
