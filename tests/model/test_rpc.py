"""llama.cpp's RPC backend over loopback: `lmserve rpc-server` serves this host's CPU, and
`lmserve serve --rpc` puts SmolLM2's layers on it (docs/deploy.md). Skipped, with the reason,
where the llama.cpp build has no RPC backend (-DGGML_RPC=ON, which make install sets).

The server's CPU backend runs the same kernels as the local one, so greedy answers match the
CPU alone; logprobs are compared within 1e-3 rather than for equality because the weights sit
in the server's plain CPU buffers, where the local CPU may use repacked layouts whose float
sums can round differently (here they came out identical)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from lmserve.engine import rpc
from lmserve.engine.runner import rpc_supported
from tests.model.conftest import Server, free_port, own_server

pytestmark = pytest.mark.skipif(not rpc_supported(), reason=(
    "this llama.cpp build has no RPC backend: build llama-cpp-python with -DGGML_RPC=ON "
    "(scripts/build_llama.sh, run by make install, does)"))

ENGINE = ("--parallel", "1", "--ctx", "512", "--threads", "2", "--store", "memory")
PROMPTS = ("The capital of France is", "Write a haiku about rivers:")


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A `lmserve rpc-server` on a free loopback port: its HOST:PORT and pid."""
    endpoint = f"127.0.0.1:{free_port()}"
    log = open(tmp_path_factory.mktemp("rpc") / "rpc-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "rpc-server", "--port",
                             endpoint.split(":")[1], "--threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_serving(endpoint, proc)
    yield endpoint, proc.pid
    proc.terminate()
    proc.wait(15)


def wait_serving(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the RPC server exited"
        try:
            rpc.probe(endpoint, timeout=2)
            return
        except rpc.RpcUnavailable:
            assert time.monotonic() < deadline, f"no RPC server on {endpoint}"
            time.sleep(0.2)


def rss(pid: int) -> int | None:
    """A process's resident memory in bytes (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return None


def answers(server: Server) -> list[tuple[str, list[float]]]:
    out = []
    for prompt in PROMPTS:
        reply = httpx.post(f"{server.base_url}/completions", timeout=120, json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "logprobs": 1})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        out.append((choice["text"], choice["logprobs"]["token_logprobs"][:8]))
    return out


def assert_same(got: list[tuple[str, list[float]]], expected: list[tuple[str, list[float]]]
                ) -> None:
    for (text, logprobs), (want, want_logprobs) in zip(got, expected, strict=True):
        assert text == want
        assert logprobs == pytest.approx(want_logprobs, abs=1e-3)


def test_layers_on_a_loopback_rpc_server_answer_as_the_cpu_alone(rpc_server, tmp_path_factory,
                                                                model_path):
    endpoint, pid = rpc_server
    before = rss(pid)
    for local in own_server(tmp_path_factory, "cpu", "smollm2", *ENGINE):
        expected = answers(local)
    for remote in own_server(tmp_path_factory, "rpc", "smollm2", *ENGINE, "--rpc", endpoint,
                             "--gpu-layers", "all"):
        place = httpx.get(f"{remote.base_url}/models/smollm2", timeout=10).json()["meta"][
            "placement"]
        assert (place["where"], place["gpu_layers"], place["kv_where"]) == ("gpu", 31, "gpu")
        assert place["devices"] == [f"RPC0 ({endpoint})"]
        assert f"all 31 layers on the GPU, as configured (RPC0 ({endpoint}))" in remote.log()
        after = rss(pid)
        assert_same(answers(remote), expected)
        if before is not None and after is not None:
            # The weights (and the KV cache) went over the socket into the server's memory.
            assert after - before > os.path.getsize(model_path) // 2
        # The server serves one client at a time: a second lmserve is refused at start.
        busy = subprocess.run([sys.executable, "-m", "lmserve", "serve", "smollm2", "--port",
                               str(free_port()), "--rpc", endpoint],
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2
        assert f"--rpc {endpoint}: connected, but no answer in 5 s; an RPC server serves " \
               "one client at a time" in busy.stderr
    # 15 layers here, the last 16 there: activations cross between the two every token.
    for split in own_server(tmp_path_factory, "split", "smollm2", *ENGINE, "--rpc", endpoint,
                            "--gpu-layers", "16"):
        place = httpx.get(f"{split.base_url}/models/smollm2", timeout=10).json()["meta"][
            "placement"]
        assert (place["where"], place["gpu_layers"]) == ("split", 16)
        assert_same(answers(split), expected)


def test_an_unreachable_rpc_server_stops_serve_at_start():
    endpoint = f"127.0.0.1:{free_port()}"
    run = subprocess.run([sys.executable, "-m", "lmserve", "serve", "smollm2", "--port",
                          str(free_port()), "--rpc", endpoint, "--gpu-layers", "all"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"lmserve: --rpc {endpoint}: nothing listens there (connection refused)" in \
        run.stderr
