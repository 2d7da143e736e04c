"""`lmserve cluster`: a local cluster for development and tests. It starts redis-server (unless
--redis names one), N `lmserve serve` replicas on their own ports sharing it, and sglang-router
in front of them, and stops them all on Ctrl-C or SIGTERM (the router first, then the replicas,
which drain, then the redis-server it started).

The command lines built here are the ones deploy/ holds (tests/unit/test_deploy.py compares).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

ROUTER_MODULE = "sglang_router.launch_router"
# With a shared system prompt a prefix-matching router sends everything to one worker unless
# its balance thresholds step in; these spread load over two replicas (issue 18).
DEFAULT_ROUTER_ARGS = ("--policy", "cache_aware", "--balance-abs-threshold", "4",
                       "--balance-rel-threshold", "1.5")
_SYSTEM_BIN = "/usr/bin:/usr/sbin:/usr/local/bin"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def replica_argv(model: str, *, port: int, store: str, host: str = "127.0.0.1",
                 threads: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "lmserve", "serve", model, "--host", host, "--port", str(port),
            "--store", store]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv + list(extra)


def router_argv(workers: Sequence[str], *, port: int, host: str = "127.0.0.1",
                args: Sequence[str] = DEFAULT_ROUTER_ARGS) -> list[str]:
    return [sys.executable, "-m", ROUTER_MODULE, "--worker-urls", *workers, "--host", host,
            "--port", str(port), *args]


def redis_argv(binary: str, *, port: int, workdir: Path) -> list[str]:
    return [binary, "--save", "", "--appendonly", "no", "--port", str(port),
            "--bind", "127.0.0.1", "--dir", str(workdir)]


def threads_per_replica(replicas: int, cpus: int | None = None) -> int:
    """Each replica's share of the CPU cores, at least one."""
    return max(1, (cpus or os.cpu_count() or 1) // max(replicas, 1))


@dataclass
class Child:
    """One child process, its output in a log file."""

    name: str
    argv: list[str]
    log_path: Path
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a replica drains), then SIGKILL after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def wait_ready(self, ready: str, timeout: float) -> None:
        """Until GET `url + ready` answers 200 (and, for the router, lists a model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
            try:
                r = httpx.get(self.url + ready, timeout=5)
                if r.status_code == 200 and (ready != "/v1/models" or r.json().get("data")):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} was not ready in {timeout:.0f}s; see {self.log_path}")


class RouterProcess(Child):
    def __init__(self, workers: Sequence[str], *, port: int | None = None,
                 host: str = "127.0.0.1", args: Sequence[str] = DEFAULT_ROUTER_ARGS,
                 log_path: Path) -> None:
        port = port or free_port(host)
        if "--prometheus-port" not in args:  # its default (29000) is taken by a second router
            args = (*args, "--prometheus-port", str(free_port(host)), "--prometheus-host", host)
        super().__init__("router", router_argv(workers, port=port, host=host, args=args),
                         log_path, f"http://{host}:{port}")

    def wait_ready(self, ready: str = "/v1/models", timeout: float = 120.0) -> None:
        super().wait_ready(ready, timeout)


@dataclass
class LocalCluster:
    model: str
    replicas: int
    workdir: Path
    redis: str | None = None  # a Redis URL to use; None: start redis-server
    host: str = "127.0.0.1"
    port: int = 30000  # the router's
    base_port: int | None = None  # the first replica's; None: free ports
    threads: int | None = None
    serve_args: Sequence[str] = ()
    router_args: Sequence[str] = DEFAULT_ROUTER_ARGS
    children: list[Child] = field(default_factory=list)
    store: str = ""

    def start(self, ready_timeout: float = 300.0) -> None:
        try:
            self._start(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, ready_timeout: float) -> None:
        self.store = self.redis or self._start_redis()
        threads = self.threads or threads_per_replica(self.replicas)
        workers = []
        for i in range(self.replicas):
            port = self.base_port + i if self.base_port else free_port(self.host)
            child = Child(f"replica {i}", replica_argv(
                self.model, port=port, store=self.store, host=self.host, threads=threads,
                extra=self.serve_args), self.workdir / f"replica-{i}.log",
                f"http://{self.host}:{port}")
            child.start()
            self.children.append(child)
            workers.append(child.url)
        for child in self.children[-self.replicas:]:
            child.wait_ready("/health/ready", ready_timeout)
        router = RouterProcess(workers, port=self.port, host=self.host, args=self.router_args,
                               log_path=self.workdir / "router.log")
        router.start()
        self.children.append(router)
        router.wait_ready(timeout=120.0)

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path=_SYSTEM_BIN)
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server); "
                               "or pass --redis URL")
        port = free_port()
        redis = Child("redis-server", redis_argv(binary, port=port, workdir=self.workdir),
                      self.workdir / "redis.log")
        redis.start()
        self.children.append(redis)
        deadline = time.monotonic() + 20
        while not _redis_ready(port):
            if not redis.running or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {redis.log_path}")
            time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    @property
    def router(self) -> Child:
        return self.children[-1]

    def first_exit(self) -> Child | None:
        return next((c for c in self.children if not c.running), None)

    def stop(self) -> None:
        """The router first (no new requests), then the replicas (they drain), then Redis."""
        for child in reversed(self.children):
            child.stop()


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _ready(cluster: LocalCluster) -> bool:
    return bool(cluster.children) and cluster.children[-1].name == "router" \
        and cluster.children[-1].running and bool(cluster.store)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2",
                   help="what each replica serves (as `lmserve serve MODEL`); default smollm2")
    p.add_argument("--replicas", type=int, default=2, help="replicas to start (default 2)")
    p.add_argument("--redis", metavar="URL",
                   help="the Redis the replicas share; default: start a redis-server")
    p.add_argument("--host", default="127.0.0.1", help="where every process listens")
    p.add_argument("--port", type=int, default=30000, help="the router's port (default 30000)")
    p.add_argument("--base-port", type=int,
                   help="the first replica's port, the next ones after it (default: free ports)")
    p.add_argument("--threads", type=int,
                   help="CPU threads per replica (default: the cores divided among replicas)")
    p.add_argument("--workdir", help="where the logs go (default: a temporary directory)")
    p.add_argument("--router-arg", action="append", dest="router_args", metavar="ARG",
                   help="an argument for sglang-router, repeatable (replaces the default "
                        f"{' '.join(DEFAULT_ROUTER_ARGS)})")
    p.add_argument("--serve-args", default="", metavar="'ARGS'",
                   help="more arguments for each `lmserve serve`, as one shell-quoted string "
                        "(e.g. '--parallel 2 --ctx 1024')")


def main(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        print("lmserve cluster: --replicas must be at least 1", file=sys.stderr)
        return 2
    serve_args = shlex.split(args.serve_args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lmserve-cluster-"))
    cluster = LocalCluster(args.model, args.replicas, workdir, redis=args.redis, host=args.host,
                           port=args.port, base_port=args.base_port, threads=args.threads,
                           serve_args=serve_args,
                           router_args=tuple(args.router_args or DEFAULT_ROUTER_ARGS))
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        if len(stopping) == 1 and cluster.children and not _ready(cluster):
            raise KeyboardInterrupt  # still starting: stop waiting for it

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"lmserve cluster: starting {args.replicas} replica(s) of {args.model}; logs in "
          f"{workdir}", flush=True)
    try:
        cluster.start()
        workers = " ".join(c.url for c in cluster.children if c.name.startswith("replica"))
        print(f"lmserve cluster: ready. Router {cluster.router.url}; replicas {workers}; "
              f"store {cluster.store}", flush=True)
        while not stopping:
            gone = cluster.first_exit()
            if gone is not None:
                print(f"lmserve cluster: {gone.name} exited; stopping (see {gone.log_path})",
                      file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        print("lmserve cluster: stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"lmserve cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmserve cluster: stopped while starting", file=sys.stderr, flush=True)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stopping
        cluster.stop()
