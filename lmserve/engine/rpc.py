"""llama.cpp's RPC backend (ggml-rpc) seen from Python, without llama.cpp: a probe of a server
before llama.cpp is let near it, and the rules for the address `lmserve rpc-server` binds.

llama.cpp's RPC client aborts the whole process when a server cannot be reached, does not
answer, or speaks another protocol version (GGML_ABORT in its dispatcher). So before
engine.runner hands an endpoint to ggml, `probe` connects itself, says HELLO as ggml's client
does and asks for the device count, and turns each of those failures into an error that names
the server. A server serves one client at a time (its accept loop runs one connection to the
end), so a server that takes the connection but does not answer is usually busy with another
client.

The wire format (ggml/src/ggml-rpc/ggml-rpc.cpp of the pinned llama.cpp, protocol 7.0.0): a
command is its id (1 byte), the size of its input (u64) and the input; an answer is its size
(u64) and its bytes. HELLO's input is the transport capabilities (24 bytes, all zero: plain
TCP); its answer is major, minor, patch, a pad byte and the server's capabilities. Little
endian, as on every host ggml's RPC runs on."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

# RPC_PROTO_MAJOR_VERSION / RPC_PROTO_MINOR_VERSION of ggml-rpc.h in the llama.cpp that
# llama-cpp-python 0.3.36 vendors; update them with the pin (the loopback model test fails
# with a version mismatch when they are stale).
PROTOCOL = (7, 0)
CMD_HELLO, CMD_DEVICE_COUNT = 14, 15  # enum rpc_cmd (HELLO is 14 in every version)
CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: transport capabilities (RDMA), zero for TCP
DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServerInfo:
    """What an RPC server said to the probe."""

    endpoint: str
    version: tuple[int, int, int]
    devices: int


class RpcUnavailable(ValueError):
    """An RPC server that llama.cpp must not be given: the message says why."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT as ggml reads it: the host is everything before the first colon."""
    host, _, port = endpoint.partition(":")
    return host, int(port)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> ServerInfo:
    """Connect, HELLO, DEVICE_COUNT, close: what the server runs, or RpcUnavailable."""
    host, port = split_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise RpcUnavailable(f"{endpoint}: cannot resolve {host!r} ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise RpcUnavailable(f"{endpoint}: nothing listens there (connection refused); start "
                             "`lmserve rpc-server` (or llama.cpp's rpc-server) on that host "
                             "first") from None
    except OSError as exc:  # timeout, no route, network unreachable
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise RpcUnavailable(f"{endpoint}: cannot connect ({why})") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", CMD_HELLO, CONN_CAPS) + bytes(CONN_CAPS))
            hello = _answer(sock, 4 + CONN_CAPS, endpoint)
            major, minor, patch = hello[0], hello[1], hello[2]
            if major != PROTOCOL[0] or minor > PROTOCOL[1]:
                raise RpcUnavailable(
                    f"{endpoint}: the server speaks RPC protocol {major}.{minor}.{patch}, this "
                    f"llama.cpp build {PROTOCOL[0]}.{PROTOCOL[1]}: run a server built from the "
                    "same llama.cpp (`lmserve rpc-server` of the same lmserve install)")
            sock.sendall(struct.pack("<BQ", CMD_DEVICE_COUNT, 0))
            (count,) = struct.unpack("<I", _answer(sock, 4, endpoint))
        except TimeoutError:
            raise RpcUnavailable(
                f"{endpoint}: connected, but no answer in {timeout:g} s; an RPC server serves "
                "one client at a time: is another lmserve or llama.cpp process using it?"
            ) from None
        except OSError as exc:
            raise RpcUnavailable(f"{endpoint}: the connection failed during the handshake "
                                 f"({exc.strerror or exc})") from None
    if count == 0:
        raise RpcUnavailable(f"{endpoint}: the server has no devices")
    return ServerInfo(endpoint, (major, minor, patch), count)


def _answer(sock: socket.socket, size: int, endpoint: str) -> bytes:
    """One answer of `size` bytes (after its u64 length), or RpcUnavailable."""
    head = _read(sock, 8)
    data = _read(sock, size) if head is not None and \
        struct.unpack("<Q", head)[0] == size else None
    if data is None:
        raise RpcUnavailable(
            f"{endpoint}: the server closed the connection or answered in another shape at the "
            f"handshake: not a ggml RPC server, or one of another protocol version (this "
            f"build speaks {PROTOCOL[0]}.{PROTOCOL[1]})")
    return data


def _read(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def bind_address(host: str) -> str:
    """The address `lmserve rpc-server --host` may bind: an IPv4 address (ggml's server takes
    nothing else), or ValueError."""
    try:
        return str(ipaddress.IPv4Address(host.strip()))
    except ValueError:
        raise ValueError(f"--host {host!r}: ggml's RPC server binds an IPv4 address only "
                         "(127.0.0.1, a private address of this host, or 0.0.0.0)") from None


def check_bind(host: str, port: int) -> None:
    """ValueError when nothing may listen on host:port (in use, or not this host's address),
    said before llama.cpp's server tries (it only prints "Failed to create server socket")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ggml's server does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: "
                             f"{exc.strerror or exc}") from None


def exposure_warning(host: str) -> str | None:
    """The warning for a server bound beyond this host, or None on a loopback address."""
    if ipaddress.IPv4Address(host).is_loopback:
        return None
    rule = "!" * 72
    return (f"{rule}\nWARNING: the RPC server listens on {host}, beyond this host.\n"
            "It has no authentication and no encryption: anyone who reaches the port can take "
            "this host's\nmemory and run computations on its devices, and sees every weight "
            "and activation sent. llama.cpp\nmarks it experimental and insecure. Never expose "
            "it to an untrusted network: use a private network\nor a firewall that admits "
            f"only the lmserve hosts.\n{rule}")
