"""Start, wait for and stop a server process on loopback (used by the benchmark scripts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import httpx


class ServerStartError(RuntimeError):
    """The server exited, or did not answer its readiness URL, during start-up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(
    command: Sequence[str],
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group; stdout and stderr go to `log_path` if given."""
    log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115 - child owns it
    try:
        return subprocess.Popen(
            list(command),
            stdout=log if log else None,
            stderr=subprocess.STDOUT if log else None,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # stop() signals the whole group (servers with workers)
        )
    finally:
        if log is not None:
            log.close()


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 300.0) -> float:
    """Poll `url` until it answers 200; return the seconds it took.

    Raises ServerStartError if the process exits first or `timeout` passes (the process is
    then stopped).
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with status {proc.returncode} during start-up")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise ServerStartError(f"no 200 from {url} within {timeout:.0f} s")


def start_lmserve(model: str, port: int, *flags: str) -> subprocess.Popen[bytes]:
    """`lmserve serve MODEL` on 127.0.0.1:`port` with `flags`, returned once /health is 200."""
    proc = start_process([sys.executable, "-m", "lmserve", "serve", model, "--port", str(port),
                          "--log-level", "warning", *flags])
    wait_ready(proc, f"http://127.0.0.1:{port}/health")
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(10)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
