"""Reliability scenarios against real `lmserve serve` processes (issue 17).

    python -m benchmarks.reliability [--only storm,overload,...] [--out FILE]

Each scenario starts its own servers (SmolLM2, `--threads 2`), drives them, and returns a
dict of figures: requests tried, answers by status, 5xx count, items lost, and whether the
scenario's outcome held (`ok`). The same functions run at a small size in
`tests/model/test_reliability.py`; this script runs them at full size, prints a table and
writes benchmarks/results/reliability.json (the figures in docs/reliability.md).

Scenarios:
  storm      clients drop mid-stream at random points (each dialect); afterwards no sequence
             runs and the server's RSS is back within a margin of its warm baseline
  overload   10x more concurrent requests than --parallel + --max-queue: 429 with Retry-After
             or a complete answer, nothing hangs, /health answers throughout
  kill9      SIGKILL while Responses chains, oLLM sessions and native streams are written
             (SQLite, Redis); after a restart every acknowledged item is readable, chains go on
  redis      Redis stopped under load (503 in each dialect's shape), then restarted (lmserve
             recovers without a restart)
  diskcache  the disk-cache directory made read-only: a warning, serving goes on
  model      the served model's file removed: the loaded model keeps serving
  config     corrupt config files: exit status 2 and a message naming the key or line
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import platform
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2"
NATIVE = f"/models/{MODEL}/"
SMALL = ("--threads", "2", "--ctx", "1024")  # every server here: small and quick to load
_SYSTEM_BIN = "/usr/bin:/usr/sbin:/usr/local/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(check: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll `check` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


# ---- processes ------------------------------------------------------------------------------

@dataclass
class Lmserve:
    """One `lmserve serve` process; its output goes to a log file."""

    args: tuple[str, ...]
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 180.0) -> Lmserve:
        self.starts += 1
        self.log_path = self.workdir / f"lmserve-{self.port}-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmserve", "serve", *self.args, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        if not until(ready, timeout, 0.2):
            raise RuntimeError(f"lmserve not ready within {timeout:.0f} s:\n{self.log()}")

    def log(self, tail: int = 6000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (over its labels) on /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        total, seen = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
        if not seen:
            raise KeyError(name)
        return total

    def idle(self) -> bool:
        return (self.metric("lmserve_requests_running") == 0
                and self.metric("lmserve_requests_waiting") == 0)

    def rss(self) -> int:
        """The server process's resident memory in bytes (VmRSS)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextmanager
def lmserve(workdir: Path, *args: str, wait: bool = True) -> Iterator[Lmserve]:
    server = Lmserve(tuple(args), workdir)
    try:
        yield server.start(wait=wait)
    finally:
        server.stop()


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path=_SYSTEM_BIN)


@dataclass
class RedisServer:
    """A throwaway redis-server on loopback that can be stopped and started again on its port
    (append-only file on, so its data survives the stop)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not until(self.ping, 20, 0.05):
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()


# ---- one request in each dialect ------------------------------------------------------------

USER = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
ANTHROPIC = {"anthropic-version": "2023-06-01"}


def dialect_call(kind: str, max_tokens: int, stream: bool) -> tuple[str, str, dict[str, Any],
                                                                    dict[str, str]]:
    """(method, path, json body, headers) of one generation in dialect `kind`."""
    m = max_tokens
    if kind == "openai":
        return "POST", "/v1/chat/completions", {"model": MODEL, "messages": USER,
                                                "max_tokens": m, "stream": stream}, {}
    if kind == "completions":
        return "POST", "/v1/completions", {"model": MODEL, "prompt": "Once upon a time",
                                           "max_tokens": m, "stream": stream}, {}
    if kind == "responses":
        return "POST", "/v1/responses", {"model": MODEL, "input": USER[0]["content"],
                                         "max_output_tokens": m, "stream": stream,
                                         "store": True}, {}
    if kind == "anthropic":
        return "POST", "/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": m,
                                        "stream": stream}, ANTHROPIC
    if kind == "ollama":
        return "POST", "/api/chat", {"model": MODEL, "messages": USER, "stream": stream,
                                     "options": {"num_predict": m}}, {}
    if kind == "sglang":
        return "POST", "/generate", {"text": "Once upon a time", "stream": stream,
                                     "sampling_params": {"max_new_tokens": m}}, {}
    if kind == "ollm":
        return "POST", "/v1/prompt/stream" if stream else "/v1/prompt", {
            "prompt": USER[0]["content"], "generation": {"max_new_tokens": m}}, {}
    if kind == "native":
        return "POST", f"{NATIVE}query/", {"prompt": USER[0]["content"],
                                           "params": {"max_tokens": m}}, {}
    raise ValueError(kind)


DIALECTS = ("openai", "completions", "responses", "anthropic", "ollama", "sglang", "ollm",
            "native")


def complete(kind: str, body: Any) -> bool:
    """Whether a 200 body (non-streamed) is a whole answer of its dialect."""
    if not isinstance(body, dict):
        return False
    if kind in ("openai", "completions"):
        return body.get("choices", [{}])[0].get("finish_reason") in ("stop", "length")
    if kind == "responses":
        return body.get("status") in ("completed", "incomplete") and bool(body.get("output"))
    if kind == "anthropic":
        return body.get("stop_reason") in ("end_turn", "max_tokens", "stop_sequence")
    if kind == "ollama":
        return body.get("done") is True
    if kind == "sglang":
        return body.get("meta_info", {}).get("finish_reason") is not None
    if kind == "ollm":
        return isinstance(body.get("text"), str) and "usage" in body
    if kind == "native":
        return body.get("stop_reason") in ("stop", "max_tokens") and "usage" in body
    return False


def tally(statuses: list[int | str]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(collections.Counter(statuses).items(), key=str)}


def fives(statuses: list[int | str]) -> int:
    return sum(1 for s in statuses if isinstance(s, int) and s >= 500)


class HealthWatch:
    """Polls /health from a thread while a scenario runs: counts answers that were not 200."""

    def __init__(self, url: str, every: float = 0.1, timeout: float = 10.0) -> None:
        self.url, self.every, self.timeout = url, every, timeout
        self.checks = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as http:
            while not self._stop.is_set():
                try:
                    status: int | str = http.get(self.url).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.checks += 1
                if status != 200:
                    self.failures.append(str(status))
                self._stop.wait(self.every)


# ---- disconnect storm -------------------------------------------------------------------------

STREAMED = ("openai", "completions", "responses", "anthropic", "ollama", "sglang", "ollm",
            "native")


async def _storm_client(http: httpx.AsyncClient, rng: random.Random, kind: str,
                        max_tokens: int) -> int | str:
    """Start a streamed generation and drop it after a random number of lines (or before
    the answer starts); returns the status seen (or the exception's name)."""
    drop_after = rng.randint(0, 12)
    try:
        if kind == "native":
            r = await http.post(f"{NATIVE}stream/", json={
                "prompt": USER[0]["content"], "params": {"max_tokens": max_tokens}})
            if r.status_code != 201:
                return r.status_code
            path, method, body, headers = f"{NATIVE}stream/{r.json()['id']}/", "GET", None, {}
        else:
            method, path, body, headers = dialect_call(kind, max_tokens, stream=True)
        async with http.stream(method, path, json=body, headers=headers) as reply:
            lines = 0
            async for _ in reply.aiter_lines():
                lines += 1
                if lines >= drop_after:
                    break
            return reply.status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def _storm(url: str, clients: int, max_tokens: int, seed: int) -> list[int | str]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        tasks = [asyncio.create_task(_storm_client(http, rng, STREAMED[i % len(STREAMED)],
                                                   max_tokens)) for i in range(clients)]
        # Some clients leave before their answer starts (while queued): cancelled mid-flight.
        early = rng.sample(range(clients), clients // 6)
        await asyncio.sleep(0.05)
        for i in early:
            await asyncio.sleep(rng.uniform(0, 0.05))
            tasks[i].cancel()
        results: list[int | str] = []
        for task in tasks:
            try:
                results.append(await task)
            except asyncio.CancelledError:
                results.append("left early")
        return results


def storm(workdir: Path, clients: int = 100, warmup: int = 20, max_tokens: int = 48,
          parallel: int = 4, margin_mib: float = 150.0, seed: int = 17) -> dict[str, Any]:
    """Clients that drop mid-stream at random points leave no running sequence, and the RSS
    returns to within `margin_mib` of the baseline taken after a warm-up storm."""
    with lmserve(workdir, MODEL, *SMALL, "--parallel", str(parallel),
                 "--store", f"sqlite://{workdir / 'storm.db'}") as server:
        asyncio.run(_storm(server.url, warmup, max_tokens, seed + 1))
        idle_after_warmup = until(server.idle, 300, 0.2)
        baseline = server.rss()
        t0 = time.monotonic()
        statuses = asyncio.run(_storm(server.url, clients, max_tokens, seed))
        storm_s = time.monotonic() - t0
        drained = until(server.idle, 300, 0.2)
        running = server.metric("lmserve_requests_running")
        waiting = server.metric("lmserve_requests_waiting")
        after = server.rss()
        # Still serving, in every dialect.
        with httpx.Client(base_url=server.url, timeout=120) as http:
            followups = {k: send(http, k, 4).status_code for k in DIALECTS}
        growth = (after - baseline) / 2**20
        result = {
            "clients": clients, "parallel": parallel, "max_tokens": max_tokens,
            "tried": clients, "statuses": tally(statuses), "5xx": fives(statuses),
            "storm_s": round(storm_s, 1), "running_after": running, "waiting_after": waiting,
            "rss_baseline_mib": round(baseline / 2**20, 1),
            "rss_after_mib": round(after / 2**20, 1),
            "rss_growth_mib": round(growth, 1), "margin_mib": margin_mib,
            "followups": followups, "lost": 0,
        }
        result["ok"] = bool(idle_after_warmup and drained and running == 0 and waiting == 0
                            and growth <= margin_mib and result["5xx"] == 0
                            and all(s == 200 for s in followups.values()))
        return result


def send(http: httpx.Client, kind: str, max_tokens: int) -> httpx.Response:
    """One non-streamed generation in dialect `kind`."""
    method, path, body, headers = dialect_call(kind, max_tokens, stream=False)
    return http.request(method, path, json=body, headers=headers)


# ---- overload ---------------------------------------------------------------------------------

OVERLOADED = ("openai", "completions", "anthropic", "ollama", "sglang", "native", "ollm",
              "responses")


async def _overload_one(http: httpx.AsyncClient, kind: str, max_tokens: int
                        ) -> dict[str, Any]:
    method, path, body, headers = dialect_call(kind, max_tokens, stream=False)
    t0 = time.monotonic()
    try:
        r = await http.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return {"kind": kind, "status": type(exc).__name__, "s": time.monotonic() - t0}
    out: dict[str, Any] = {"kind": kind, "status": r.status_code, "s": time.monotonic() - t0,
                           "retry_after": r.headers.get("retry-after")}
    if r.status_code == 200:
        out["complete"] = complete(kind, r.json())
    return out


async def _overload(url: str, n: int, max_tokens: int, timeout: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        return list(await asyncio.gather(*(
            _overload_one(http, OVERLOADED[i % len(OVERLOADED)], max_tokens)
            for i in range(n))))


def overload(workdir: Path, parallel: int = 2, max_queue: int = 2, factor: int = 10,
             max_tokens: int = 16, timeout: float = 600.0) -> dict[str, Any]:
    """`factor` x (parallel + max_queue) requests at once: each is a whole answer or a 429
    with Retry-After, none hangs (the client's timeout), and /health answers throughout."""
    n = factor * (parallel + max_queue)
    with lmserve(workdir, MODEL, *SMALL, "--parallel", str(parallel), "--max-queue",
                 str(max_queue), "--store", f"sqlite://{workdir / 'overload.db'}") as server:
        with HealthWatch(f"{server.url}/health") as health:
            t0 = time.monotonic()
            replies = asyncio.run(_overload(server.url, n, max_tokens, timeout))
            wall = time.monotonic() - t0
        statuses = [r["status"] for r in replies]
        refused = [r for r in replies if r["status"] == 429]
        accepted = [r for r in replies if r["status"] == 200]
        result = {
            "parallel": parallel, "max_queue": max_queue, "tried": n,
            "statuses": tally(statuses), "5xx": fives(statuses),
            "accepted": len(accepted), "complete": sum(1 for r in accepted if r["complete"]),
            "refused_429": len(refused),
            "429_without_retry_after": sum(1 for r in refused if not r["retry_after"]),
            "429_max_s": round(max((r["s"] for r in refused), default=0.0), 2),
            "429_median_s": round(sorted(r["s"] for r in refused)[len(refused) // 2], 3)
            if refused else None,
            "accepted_max_s": round(max((r["s"] for r in accepted), default=0.0), 2),
            "hung": sum(1 for s in statuses if s in ("ReadTimeout", "PoolTimeout")),
            "wall_s": round(wall, 1), "health_checks": health.checks,
            "health_failures": len(health.failures), "lost": 0,
            "idle_after": until(server.idle, 120, 0.2),
        }
        result["ok"] = bool(set(statuses) <= {200, 429} and result["complete"] == len(accepted)
                            and refused and accepted and not result["429_without_retry_after"]
                            and not health.failures and health.checks > 0
                            and result["idle_after"])
        return result


# ---- kill -9 while writing ----------------------------------------------------------------------

@dataclass
class Acked:
    """What the server acknowledged before it was killed."""

    chains: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # (id, text)
    sessions: dict[str, int] = field(default_factory=dict)  # session id -> answered turns
    streams: list[str] = field(default_factory=list)

    def count(self) -> int:
        return (sum(len(c) for c in self.chains.values()) + sum(self.sessions.values())
                + len(self.streams))


def _response_text(body: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for item in body.get("output", [])
                   if item.get("type") == "message" for part in item.get("content", []))


async def _write_chain(http: httpx.AsyncClient, acked: Acked, chain: int,
                       stop: asyncio.Event) -> None:
    acked.chains[chain] = []
    turn = 0
    while not stop.is_set():
        last = acked.chains[chain][-1][0] if acked.chains[chain] else None
        try:
            r = await http.post("/v1/responses", json={
                "model": MODEL, "input": f"Turn {turn}: name a colour.", "store": True,
                "max_output_tokens": 6, "previous_response_id": last})
        except httpx.HTTPError:
            return  # the server was killed under this request: not acknowledged
        if r.status_code == 200:
            acked.chains[chain].append((r.json()["id"], _response_text(r.json())))
        turn += 1


async def _write_session(http: httpx.AsyncClient, acked: Acked, stop: asyncio.Event) -> None:
    try:
        r = await http.post("/v1/sessions", json={"generation": {"max_new_tokens": 6}})
        if r.status_code != 200:
            return
        sid = r.json()["session_id"]
        acked.sessions[sid] = 0
        while not stop.is_set():
            r = await http.post(f"/v1/sessions/{sid}/prompt",
                                json={"prompt": f"Turn {acked.sessions[sid]}: a number?"})
            if r.status_code == 200:
                acked.sessions[sid] += 1
    except httpx.HTTPError:
        return


async def _write_streams(http: httpx.AsyncClient, acked: Acked, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            r = await http.post(f"{NATIVE}stream/", json={
                "prompt": USER[0]["content"], "params": {"max_tokens": 40}})
        except httpx.HTTPError:
            return
        if r.status_code != 201:
            continue
        acked.streams.append(r.json()["id"])
        try:  # a reader follows it to the end, then the next stream starts
            async with http.stream("GET", f"{NATIVE}stream/{r.json()['id']}/") as reply:
                async for _ in reply.aiter_lines():
                    pass
        except httpx.HTTPError:
            return


async def _write_until_killed(server: Lmserve, chains: int, sessions: int, streams: int,
                              kill_after: int, seed: int) -> Acked:
    acked, stop = Acked(), asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
        tasks = [asyncio.create_task(_write_chain(http, acked, i, stop)) for i in range(chains)]
        tasks += [asyncio.create_task(_write_session(http, acked, stop))
                  for _ in range(sessions)]
        tasks += [asyncio.create_task(_write_streams(http, acked, stop)) for _ in range(streams)]
        while acked.count() < kill_after or not acked.streams or len(acked.sessions) < sessions \
                or not all(acked.chains.get(i) for i in range(chains)) \
                or not all(acked.sessions.values()):
            await asyncio.sleep(0.05)
        await asyncio.sleep(random.Random(seed).uniform(0, 1.0))  # mid-write, at a random time
        await asyncio.to_thread(server.kill9)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return acked


def _read_stream(http: httpx.Client, ident: str, deadline: float) -> tuple[int, list[str]]:
    """(status, events) of a native stream read to its end, or until `deadline` seconds."""
    events: list[str] = []
    t0 = time.monotonic()
    try:
        with http.stream("GET", f"{NATIVE}stream/{ident}/", timeout=deadline) as r:
            if r.status_code != 200:
                return r.status_code, events
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                if time.monotonic() - t0 > deadline:
                    break
            return r.status_code, events
    except httpx.HTTPError as exc:
        return 0, [*events, type(exc).__name__]


def kill9(workdir: Path, store: str = "sqlite", chains: int = 4, sessions: int = 2,
          streams: int = 1, kill_after: int = 12, seed: int = 9,
          lease_ttl: float | None = None) -> dict[str, Any]:
    """SIGKILL while Responses chains, oLLM sessions and native streams are written; after a
    restart on the same store every acknowledged item is readable and every chain goes on.
    `lease_ttl` (Redis): the store URL's option, how soon the restarted server counts the
    killed one as gone and ends its open streams (None: the default, 15 s)."""
    with contextlib_redis(workdir, store == "redis") as redis:
        url = redis.url if redis else f"sqlite://{workdir / 'kill9.db'}"
        if redis and lease_ttl is not None:
            url += f"?lease_ttl={lease_ttl:g}"
        server = Lmserve((MODEL, *SMALL, "--parallel", "4", "--store", url), workdir)
        server.start()
        try:
            t0 = time.monotonic()
            acked = asyncio.run(_write_until_killed(server, chains, sessions, streams,
                                                    kill_after, seed))
            server.start()  # the same port and store
            restart_s = time.monotonic() - t0
            return _check_acked(server, acked) | {"store": store, "restart_s": round(
                restart_s, 1)}
        finally:
            server.stop()


@contextmanager
def contextlib_redis(workdir: Path, wanted: bool) -> Iterator[RedisServer | None]:
    if not wanted:
        yield None
        return
    with redis_server(workdir) as redis:
        yield redis


def _check_acked(server: Lmserve, acked: Acked) -> dict[str, Any]:
    lost: list[str] = []
    statuses: list[int | str] = []
    continued = ended_by_restart = 0
    with httpx.Client(base_url=server.url, timeout=300) as http:
        for chain in acked.chains.values():
            for ident, text in chain:
                r = http.get(f"/v1/responses/{ident}")
                statuses.append(r.status_code)
                if r.status_code != 200 or _response_text(r.json()) != text:
                    lost.append(ident)
            if chain:  # the chain goes on from its last acknowledged response
                r = http.post("/v1/responses", json={
                    "model": MODEL, "input": "One more word.", "store": True,
                    "max_output_tokens": 4, "previous_response_id": chain[-1][0]})
                statuses.append(r.status_code)
                items = http.get(f"/v1/responses/{r.json()['id']}/input_items",
                                 params={"limit": 100}) if r.status_code == 200 else None
                if items is not None and items.status_code == 200 and \
                        len(items.json()["data"]) >= 2 * len(chain) + 1:
                    continued += 1
                else:
                    lost.append(f"chain from {chain[-1][0]}")
        for sid, turns in acked.sessions.items():
            r = http.get(f"/v1/sessions/{sid}")
            statuses.append(r.status_code)
            if r.status_code != 200 or r.json()["message_count"] < 2 * turns:
                lost.append(sid)
                continue
            r = http.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "And now?"})
            statuses.append(r.status_code)
            if r.status_code == 200:
                continued += 1
            else:
                lost.append(f"session {sid} goes on")
        for ident in acked.streams:
            status, events = _read_stream(http, ident, 60)
            statuses.append(status)
            if status != 200 or not events or events[0] != "message.start" or \
                    events[-1] != "message.stop":
                lost.append(f"stream {ident}: {status} {events[-3:]}")
            ended_by_restart += "error" in events  # its producer died with the old process
    return {"acknowledged": acked.count(),
            "responses": sum(len(c) for c in acked.chains.values()),
            "session_turns": sum(acked.sessions.values()), "sessions": len(acked.sessions),
            "streams": len(acked.streams), "streams_ended_by_restart": ended_by_restart,
            "tried": len(statuses),
            "statuses": tally(statuses), "5xx": fives(statuses), "continued": continued,
            "lost": len(lost), "lost_items": lost[:20], "ok": not lost and not fives(statuses)}


# ---- Redis stopped and restarted under load --------------------------------------------------

STORE_DIALECTS = ("responses", "ollm-session", "native-stream")  # these need the store
PLAIN_DIALECTS = ("openai", "anthropic", "ollama")  # these do not


def _shape_ok(kind: str, r: httpx.Response) -> bool:
    """A 503 in the dialect's own error shape, with Retry-After."""
    if r.status_code != 503 or not r.headers.get("retry-after"):
        return False
    body = r.json()
    if kind == "responses":
        return body["error"]["type"] == "service_unavailable_error" and \
            body["error"]["code"] == "store_unavailable"
    if kind == "ollm-session":
        return isinstance(body.get("detail"), str)
    if kind == "native-stream":
        return body["error"]["type"] == "unavailable"
    return False


async def _redis_op(http: httpx.AsyncClient, kind: str, sessions: list[str]
                    ) -> tuple[int | str, bool]:
    """One request of `kind`: (status or exception name, whether a 503 had the right shape)."""
    try:
        if kind == "responses":
            r = await http.post("/v1/responses", json={"model": MODEL, "input": "A colour?",
                                                       "max_output_tokens": 4, "store": True})
        elif kind == "ollm-session":  # a session of its own: one session takes one turn at once
            created = await http.post("/v1/sessions", json={"generation": {"max_new_tokens": 4}})
            if created.status_code != 200:
                return created.status_code, _shape_ok(kind, created)
            sid = created.json()["session_id"]
            sessions.append(sid)
            r = await http.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "Hi?"})
        elif kind == "native-stream":
            r = await http.post(f"{NATIVE}stream/", json={"prompt": "Hi",
                                                          "params": {"max_tokens": 4}})
            if r.status_code == 201:
                async with http.stream("GET", f"{NATIVE}stream/{r.json()['id']}/") as read:
                    async for _ in read.aiter_lines():
                        pass
                    return read.status_code, True
        else:
            method, path, body, headers = dialect_call(kind, 4, stream=False)
            r = await http.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return type(exc).__name__, False
    return r.status_code, r.status_code != 503 or _shape_ok(kind, r)


async def _redis_phase(url: str, ops: int, sessions: list[str]
                       ) -> dict[str, list[tuple[int | str, bool]]]:
    kinds = STORE_DIALECTS + PLAIN_DIALECTS
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        results = await asyncio.gather(*(_redis_op(http, kinds[i % len(kinds)], sessions)
                                         for i in range(ops)))
    out: dict[str, list[tuple[int | str, bool]]] = {k: [] for k in kinds}
    for i, result in enumerate(results):
        out[kinds[i % len(kinds)]].append(result)
    return out


def redis_outage(workdir: Path, ops: int = 12, recover_timeout: float = 60.0) -> dict[str, Any]:
    """Redis stopped under load: the store's dialects answer 503 in their shapes (the others
    keep serving); Redis started again: lmserve recovers without a restart."""
    with redis_server(workdir) as redis, lmserve(workdir, MODEL, *SMALL, "--parallel", "4",
                                                 "--store", redis.url) as server:
        sessions: list[str] = []
        before = asyncio.run(_redis_phase(server.url, ops, sessions))
        redis.stop()
        down = asyncio.run(_redis_phase(server.url, ops, sessions))
        redis.start()
        t0 = time.monotonic()

        def store_answers() -> bool:
            return httpx.get(f"{server.url}/v1/responses/resp_missing",
                             timeout=30).status_code == 404
        recovered = until(store_answers, recover_timeout, 0.2)
        recovery_s = time.monotonic() - t0
        after = asyncio.run(_redis_phase(server.url, ops, sessions))
        pid_same = server.proc is not None and server.proc.poll() is None and server.starts == 1
    phases = {"before": before, "down": down, "after": after}
    statuses = [s for phase in phases.values() for res in phase.values() for s, _ in res]
    by_phase = {name: {k: tally([s for s, _ in res]) for k, res in phase.items()}
                for name, phase in phases.items()}
    down_store = [s for k in STORE_DIALECTS for s, _ in down[k]]
    result = {
        "tried": len(statuses), "statuses": tally(statuses), "5xx": fives(statuses),
        "500s": sum(1 for s in statuses if s == 500), "by_phase": by_phase,
        "down_503": sum(1 for s in down_store if s == 503),
        "down_bad_shape": sum(1 for k in STORE_DIALECTS for _, ok in down[k] if not ok),
        "recovered": recovered, "recovery_s": round(recovery_s, 2), "lost": 0,
        "lmserve_restarted": not pid_same,
    }
    ok_before = all(s in (200, 201) for res in before.values() for s, _ in res)
    ok_after = all(s in (200, 201) for res in after.values() for s, _ in res)
    plain_down = all(s == 200 for k in PLAIN_DIALECTS for s, _ in down[k])
    result["ok"] = bool(ok_before and ok_after and plain_down and recovered and pid_same
                        and result["500s"] == 0 and down_store
                        and all(s == 503 for s in down_store)
                        and result["down_bad_shape"] == 0)
    return result


# ---- the disk cache's directory unwritable ---------------------------------------------------

def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


LONG = " ".join(f"Note {i}: the ferry to island {i % 9} leaves at {i % 12 + 1} o'clock."
                for i in range(30))  # about 450 tokens


def disk_cache_fault(workdir: Path, mode: str = "readonly", requests: int = 4
                     ) -> dict[str, Any]:
    """The disk cache's directory made read-only ("readonly") or full ("full", a 1 MiB tmpfs)
    after start: a warning in the log, and every request is still answered."""
    cache = workdir / f"disk-cache-{mode}"
    cache.mkdir()
    how = mode
    mounted = False
    if mode == "full":
        mounted = _mount_tmpfs(cache, "1m")
        if not mounted:
            return {"mode": mode, "skipped": "needs root to mount a small tmpfs", "ok": True,
                    "tried": 0, "statuses": {}, "5xx": 0, "lost": 0}
    try:
        with lmserve(workdir, MODEL, *SMALL, "--parallel", "2", "--disk-cache", str(cache),
                     "--disk-cache-min-tokens", "64", "--store", "memory") as server:
            if mode == "readonly":
                if os.geteuid() != 0:
                    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)  # r-x: no new files
                    how = "chmod 0500"
                elif _mount_tmpfs(cache, "64m"):
                    mounted = True
                    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
                    how = "read-only tmpfs mount"
                else:  # root ignores permission bits: make the path no directory at all
                    shutil.rmtree(cache)
                    cache.write_text("not a directory")
                    how = "directory replaced by a file"
            statuses: list[int | str] = []
            with httpx.Client(base_url=server.url, timeout=300) as http:
                for i in range(requests):
                    r = http.post("/v1/completions", json={
                        "model": MODEL, "prompt": f"{LONG}\nQuestion {i}: which ferry?",
                        "max_tokens": 4})
                    statuses.append(r.status_code)

                def warned() -> bool:
                    return "disk cache: could not save" in server.log(10**6)
                warning = until(warned, 60, 0.2)
                after = http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": USER, "max_tokens": 4}).status_code
                statuses.append(after)
                health = httpx.get(f"{server.url}/health").status_code
            lines = [ln for ln in server.log(10**6).splitlines() if "disk cache" in ln]
    finally:
        if mounted:
            _umount(cache)
        if cache.exists() and not cache.is_dir():
            cache.unlink()
        elif cache.exists():
            cache.chmod(stat.S_IRWXU)
    return {"mode": mode, "how": how, "tried": len(statuses), "statuses": tally(statuses),
            "5xx": fives(statuses), "warning": warning, "health": health,
            "log": lines[-1][-200:] if lines else None, "lost": 0,
            "ok": bool(warning and all(s == 200 for s in statuses) and health == 200)}


# ---- the model's file removed while listed ---------------------------------------------------

def model_removed(workdir: Path, requests: int = 3) -> dict[str, Any]:
    """The served GGUF deleted while the server runs: the loaded model keeps serving, stays
    listed, /health stays 200 (models load at start; on-demand loading is another issue)."""
    from lmserve.models.resolve import resolve

    path = workdir / "removable.gguf"
    shutil.copyfile(resolve(MODEL).path, path)
    with lmserve(workdir, f"{MODEL}={path}", *SMALL, "--parallel", "2", "--store",
                 "memory", "--disk-cache", str(workdir / "dc-model"),
                 "--disk-cache-min-tokens", "64") as server:
        path.unlink()
        statuses: list[int | str] = []
        with httpx.Client(base_url=server.url, timeout=300) as http:
            for i in range(requests):
                for kind in ("openai", "anthropic", "ollama", "native"):
                    statuses.append(send(http, kind, 4).status_code)
                statuses.append(http.post("/v1/completions", json={
                    "model": MODEL, "prompt": f"{LONG}\nQuestion {i}?",
                    "max_tokens": 4}).status_code)
            listed = MODEL in [m["id"] for m in http.get("/v1/models").json()["data"]]
            tags = http.get("/api/tags").status_code
            health = http.get("/health").status_code
            alive = server.proc is not None and server.proc.poll() is None
    return {"tried": len(statuses), "statuses": tally(statuses), "5xx": fives(statuses),
            "listed": listed, "tags": tags, "health": health, "alive": alive, "lost": 0,
            "ok": bool(all(s == 200 for s in statuses) and listed and health == 200
                       and tags == 200 and alive)}


# ---- corrupt config files ----------------------------------------------------------------------

BAD_CONFIGS = (  # (file name, content, what the message must name)
    ("syntax.toml", "[server\nport = 8000\n", "line 1"),
    ("syntax.json", '{"parallel": 2,, "n_ctx": 512}', "line 1"),
    ("type.toml", 'parallel = "many"\n', "parallel"),
    ("bool.toml", "[model]\nn_ctx = true\n", "n_ctx"),
    ("unknown.toml", "paralel = 4\n", "paralel"),
    ("range.json", '{"max_queue": -1}', "max_queue"),
    ("choice.toml", 'kv_layout = "sideways"\n', "kv_layout"),
    ("list.toml", "api_keys = 5\n", "api_keys"),
    ("float.toml", "threads = 1.5\n", "threads"),
    ("port.json", '{"port": 99999}', "port"),
)


def corrupt_config(workdir: Path, workers: int = 4) -> dict[str, Any]:
    """Each bad config file stops `lmserve serve` at start with exit status 2 and a message
    naming the key or the line, before any port is bound."""
    def start(case: tuple[str, str, str]) -> dict[str, Any]:
        name, content, named = case
        path = workdir / name
        path.write_text(content)
        port = free_port()
        try:
            flags = () if name.startswith("port") else ("--port", str(port))  # flags win
            run = subprocess.run([sys.executable, "-m", "lmserve", "serve", MODEL, "--config",
                                  str(path), *flags], capture_output=True, text=True,
                                 timeout=120)
            rc: int | str = run.returncode
            message = (run.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            rc, message = "hung", ""
        return {"file": name, "rc": rc, "message": message[:160], "names": named in message}

    # Each start is a process of its own; a few at once (they only import and read a file).
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        cases = list(pool.map(start, BAD_CONFIGS))
    statuses: list[int | str] = [c["rc"] for c in cases]
    return {"tried": len(cases), "statuses": tally(statuses), "5xx": 0, "lost": 0,
            "cases": cases, "ok": all(c["rc"] == 2 and c["names"] for c in cases)}


# ---- the script ----------------------------------------------------------------------------------

def scenarios() -> dict[str, Callable[[Path], dict[str, Any]]]:
    """Each scenario at full size, by name (the tests call the functions at a small size)."""
    return {
        "storm": lambda d: storm(d, clients=100, warmup=20, max_tokens=48, parallel=4),
        "overload": lambda d: overload(d, parallel=2, max_queue=2, factor=10, max_tokens=16),
        "kill9-sqlite": lambda d: kill9(d, "sqlite", chains=6, sessions=3, streams=2,
                                        kill_after=40),
        "kill9-redis": lambda d: kill9(d, "redis", chains=6, sessions=3, streams=2,
                                       kill_after=40),
        "redis-outage": lambda d: redis_outage(d, ops=24),
        "diskcache-readonly": lambda d: disk_cache_fault(d, "readonly", requests=4),
        "diskcache-full": lambda d: disk_cache_fault(d, "full", requests=4),
        "model-removed": lambda d: model_removed(d, requests=3),
        "corrupt-config": corrupt_config,
    }


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--out", default=str(RESULTS / "reliability.json"))
    args = parser.parse_args()
    chosen = {k: v for k, v in scenarios().items()
              if not args.only or k in args.only.split(",")}
    results: dict[str, Any] = {}
    for name, run in chosen.items():
        print(f"-- {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"lmserve-rel-{name}-") as tmp:
            t0 = time.monotonic()
            try:
                results[name] = run(Path(tmp))
            except Exception as exc:  # a scenario that breaks is a result too
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps(results[name]), flush=True)
    print(f"\n{'scenario':<20} {'ok':<4} {'tried':>5} {'5xx':>4} {'lost':>4}  statuses")
    for name, r in results.items():
        shown = r.get("statuses", r.get("error"))
        print(f"{name:<20} {'yes' if r.get('ok') else 'NO':<4} {r.get('tried', '-'):>5} "
              f"{r.get('5xx', '-'):>4} {r.get('lost', '-'):>4}  {shown}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "command": "python -m benchmarks.reliability"
                               + (f" --only {args.only}" if args.only else ""),
                               "results": results}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
