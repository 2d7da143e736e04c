"""What the command line needs of llama.cpp's RPC backend: the start-up check of `lmserve serve
--rpc`, and `lmserve rpc-server`, which serves this host's devices to other hosts through
llama.cpp's own server (ggml_backend_rpc_start_server, in engine.runner). docs/deploy.md."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable, Sequence

from lmserve.engine import rpc, runner


def check(endpoints: Iterable[str]) -> None:
    """Refuse servers llama.cpp cannot use (a build without the RPC backend, a server that
    cannot be reached, is busy or speaks another protocol): ValueError naming --rpc."""
    try:
        runner.check_rpc_servers(list(endpoints))
    except ValueError as exc:  # rpc.RpcUnavailable: "HOST:PORT: why"
        raise ValueError(f"--rpc {exc}") from None
    except RuntimeError as exc:  # no RPC backend in this build
        raise ValueError(f"--rpc: {exc}") from None


def serve(host: str, port: int, *, threads: int | None, cache_dir: str | None,
          device_names: Sequence[str]) -> int:
    """Serve until SIGINT or SIGTERM (exit 0); 2 when it cannot start, 1 when llama.cpp's
    server gave up (it printed why). Never returns after the server started."""
    try:
        host = rpc.bind_address(host)
        if not 0 < port < 65536:
            raise ValueError(f"--port {port}: a port is 1-65535")
        if threads is not None and threads < 1:
            raise ValueError("--threads must be at least 1")
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
        if not runner.rpc_supported():
            raise ValueError("this llama.cpp build has no RPC backend; build llama-cpp-python "
                             "with -DGGML_RPC=ON (make install does)")
        devices = runner.rpc_server_devices(device_names)
        rpc.check_bind(host, port)
    except (ValueError, OSError) as exc:
        print(f"lmserve rpc-server: {exc}", file=sys.stderr)
        return 2
    warning = rpc.exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    endpoint = f"{host}:{port}"
    # llama.cpp's server has no stop call: it runs in a daemon thread, the main thread waits
    # for a signal, and the process ends without unwinding the thread blocked in C.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(
        target=runner.serve_rpc, args=(endpoint, [dev for dev, _ in devices]), daemon=True,
        kwargs={"cache_dir": cache_dir, "threads": threads or runner.default_threads()},
        name="rpc-server")
    thread.start()
    print(f"lmserve rpc-server: serving {', '.join(d.name for _, d in devices)} on {endpoint} "
          "(llama.cpp RPC protocol {}.{}) until SIGINT or SIGTERM".format(*rpc.PROTOCOL),
          file=sys.stderr, flush=True)
    while thread.is_alive() and not stop.wait(0.5):
        pass
    sys.stdout.flush()
    if stop.is_set():
        print("lmserve rpc-server: stopped", file=sys.stderr, flush=True)
        os._exit(0)
    print(f"lmserve rpc-server: could not serve on {endpoint} (llama.cpp said why above)",
          file=sys.stderr, flush=True)
    os._exit(1)
