"""llama.cpp's RPC backend seen from lmserve (lmserve.engine.rpc): the probe that stands between
an --rpc server and ggml's client (which aborts the process on a server it cannot use), against
small servers that answer as ggml's does or misbehave, and the checks of `lmserve rpc-server`.
The loopback test with a real server is tests/model/test_rpc.py."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from lmserve import config
from lmserve.cli import check_rpc, main
from lmserve.engine import rpc
from lmserve.engine.runner import rpc_supported


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def ggml_like(version: tuple[int, int, int] = (7, 0, 0), devices: int = 1
              ) -> Callable[[socket.socket], None]:
    """One client's session as ggml's rpc_serve_client runs it: HELLO, then DEVICE_COUNT."""
    def session(conn: socket.socket) -> None:
        hello = _read(conn, 1 + 8 + rpc.CONN_CAPS)
        assert hello[0] == rpc.CMD_HELLO and struct.unpack("<Q", hello[1:9])[0] == rpc.CONN_CAPS
        conn.sendall(struct.pack("<Q", 4 + rpc.CONN_CAPS) + bytes([*version, 0]) +
                     bytes(rpc.CONN_CAPS))
        command = _read(conn, 9)
        if command:
            assert command == struct.pack("<BQ", rpc.CMD_DEVICE_COUNT, 0)
            conn.sendall(struct.pack("<QI", 4, devices))
        _read(conn, 1)  # until the client closes
    return session


@pytest.fixture()
def serve_once() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A listening socket whose first client gets `session`; its HOST:PORT."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(session: Callable[[socket.socket], None]) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                session(conn)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(5)


def test_a_server_that_answers_as_ggml_does_passes_with_its_devices(serve_once):
    endpoint = serve_once(ggml_like(devices=2))
    assert rpc.probe(endpoint) == rpc.ServerInfo(endpoint, (7, 0, 0), 2)


def test_nothing_listening_is_refused_naming_the_server():
    endpoint = f"127.0.0.1:{_free_port()}"
    with pytest.raises(rpc.RpcUnavailable, match=f"{endpoint}: nothing listens there"):
        rpc.probe(endpoint)


def test_a_server_that_takes_the_connection_but_stays_silent_is_called_busy(serve_once):
    held = threading.Event()
    endpoint = serve_once(lambda conn: held.wait(5))  # another client's turn, in ggml's loop
    with pytest.raises(rpc.RpcUnavailable, match="no answer in 0.3 s; an RPC server serves one "
                                                 "client at a time"):
        rpc.probe(endpoint, timeout=0.3)
    held.set()


def test_a_server_of_another_protocol_or_kind_is_refused(serve_once):
    endpoint = serve_once(ggml_like(version=(6, 1, 0)))
    with pytest.raises(rpc.RpcUnavailable, match="speaks RPC protocol 6.1.0, this llama.cpp "
                                                 "build 7.0"):
        rpc.probe(endpoint)
    endpoint = serve_once(ggml_like(version=(7, 3, 0)))  # a newer minor: ggml refuses it too
    with pytest.raises(rpc.RpcUnavailable, match="7.3.0"):
        rpc.probe(endpoint)
    endpoint = serve_once(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with pytest.raises(rpc.RpcUnavailable, match="not a ggml RPC server"):
        rpc.probe(endpoint)
    endpoint = serve_once(ggml_like(devices=0))
    with pytest.raises(rpc.RpcUnavailable, match="has no devices"):
        rpc.probe(endpoint)


def test_serve_refuses_an_unusable_server_before_binding_naming_the_flag():
    from lmserve.engine.runner import rpc_supported

    endpoint = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError) as refused:
        check_rpc(config.build({"rpc": endpoint}))
    assert str(refused.value).startswith(
        f"--rpc {endpoint}: nothing listens there" if rpc_supported() else
        "--rpc: this llama.cpp build has no RPC backend")
    check_rpc(config.build({}))  # no servers: nothing to check


def test_the_rpc_server_binds_ipv4_only_and_warns_beyond_loopback(capsys):
    assert rpc.bind_address(" 127.0.0.1 ") == "127.0.0.1"
    for bad in ("localhost", "::1", "10.0.0.300"):
        with pytest.raises(ValueError, match="binds an IPv4 address only"):
            rpc.bind_address(bad)
    assert rpc.exposure_warning("127.0.0.1") is None is rpc.exposure_warning("127.0.0.2")
    for host in ("0.0.0.0", "192.168.1.5"):
        warning = rpc.exposure_warning(host)
        assert warning and f"listens on {host}" in warning and \
            "Never expose it to an untrusted network" in warning
    assert main(["rpc-server", "--host", "localhost"]) == 2
    assert "--host 'localhost': ggml's RPC server binds an IPv4 address only" in \
        capsys.readouterr().err
    assert main(["rpc-server", "--port", "0"]) == 2
    assert "--port 0: a port is 1-65535" in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_llama_cpp_tries():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}: Address "
                                             "already in use"):
            rpc.check_bind("127.0.0.1", port)
    rpc.check_bind("127.0.0.1", port)  # free again


@pytest.mark.skipif(not rpc_supported(), reason="this llama.cpp build has no RPC backend "
                    "(-DGGML_RPC=ON, which scripts/build_llama.sh sets)")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_rpc_server_serves_this_hosts_cpu_until_a_signal_stops_it(stop):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "rpc-server", "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = rpc.probe(f"127.0.0.1:{port}", timeout=2)
                break
            except rpc.RpcUnavailable:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert info.version[:2] == rpc.PROTOCOL and info.devices == 1  # the CPU
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert f"serving CPU on 127.0.0.1:{port}" in err and err.rstrip().endswith(
        "lmserve rpc-server: stopped")
    assert "Accepted client connection" in out  # llama.cpp's own log of the probe
