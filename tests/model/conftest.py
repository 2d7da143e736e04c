"""A real `lmserve serve` process with the bundled SmolLM2 model, shared by the model tests."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from lmserve.models.resolve import resolve
from tests.model.upstream_fixtures import (  # noqa: F401  (fixtures and hooks, used by name)
    pytest_configure,
    pytest_generate_tests,
    target,
    upstream_front,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def assert_generation_stops(self, timeout: float = 30.0) -> None:
        """After a client left: no request runs and no token is generated any more."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.metric("lmserve_requests_running") > 0:
            time.sleep(0.1)
        assert self.metric("lmserve_requests_running") == 0
        generated = self.metric("lmserve_generated_tokens_total")
        time.sleep(0.5)
        assert self.metric("lmserve_generated_tokens_total") == generated

    def flush(self, timeout: float = 10.0) -> None:
        """Empty the prefix cache (SGLang's /flush_cache), retrying while requests finish."""
        deadline = time.monotonic() + timeout
        while httpx.post(f"{self.url}/flush_cache", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the server stayed busy"
            time.sleep(0.1)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def start_server(tmp_dir: str, *args: str, wait: bool = True) -> Server:
    port = free_port()
    log_path = os.path.join(tmp_dir, f"server-{port}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    if wait:
        wait_ready(server)
    return server


def own_server(tmp_path_factory: pytest.TempPathFactory, name: str,
               *args: str) -> Iterator[Server]:
    """A test module's own server, for a module-scoped fixture to `yield from`."""
    srv = start_server(str(tmp_path_factory.mktemp(name)), *args)
    yield srv
    stop_server(srv)


def post_together(server: Server, path: str, bodies: list[dict]) -> list[dict]:
    """POST every body to `path` at once (the KV emptied first) and return the JSON answers,
    each asserted to be a 200."""
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{server.url}{path}", json=b)
                                          for b in bodies))

    server.flush()
    replies = asyncio.run(run())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return [r.json() for r in replies]


def start_with_template(tmp_dir: str, template: str) -> Server:
    """A server of a test module's own: SmolLM2 under a chat template override."""
    path = os.path.join(tmp_dir, "template.jinja")
    with open(path, "w", encoding="utf-8") as f:
        f.write(template)
    return start_server(tmp_dir, "smollm2", "--parallel", "2", "--ctx", "2048", "--threads", "2",
                        "--chat-template", path, "--data-dir", tmp_dir)


def wait_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready in {timeout}s:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve("smollm2").path


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = str(tmp_path_factory.mktemp("server"))
    srv = start_server(tmp, "smollm2", "--parallel", "4", "--ctx", "4096", "--threads", "2",
                       "--data-dir", tmp)
    yield srv
    stop_server(srv)


@pytest.fixture(autouse=True)
def empty_kv(request: pytest.FixtureRequest) -> None:
    """Each test that uses the shared server starts with its KV pool empty. Greedy output is
    a function of the KV layout as well as the tokens: float sums over cells laid out
    differently by earlier tests' leftovers can break a near-tie another way, so a test that
    compares two generations must not depend on which tests ran before it."""
    if "server" in request.fixturenames:
        request.getfixturevalue("server").flush()


@pytest.fixture()
def client(target: Server):
    import openai

    with openai.OpenAI(base_url=target.base_url, api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c
