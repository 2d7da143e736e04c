"""A tiny HTTP server in a thread, serving fixed answers: the image host of the media tests
(image URLs fetched under the media policy). Bound to 127.0.0.1 on a free port; `url(path)` on
127.0.0.1, `url(path, host="localhost")` names the same server by another host (one the tests
leave off the allow list)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    body: bytes = b""
    content_type: str | None = "image/png"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a slow host)
    length: bool = True  # send Content-Length (else the body runs to the connection's end)


class MediaHost:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.hits: dict[str, int] = {}

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@contextmanager
def media_host(answers: dict[str, Answer]) -> Iterator[MediaHost]:
    stop = threading.Event()
    host: MediaHost

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            answer = answers.get(self.path)
            host.hits[self.path] = host.hits.get(self.path, 0) + 1
            if answer is None:
                answer = Answer(b"not found", "text/plain", 404)
            if answer.delay:
                stop.wait(answer.delay)
            self.send_response(answer.status)
            if answer.content_type:
                self.send_header("Content-Type", answer.content_type)
            for name, value in answer.headers.items():  # "{port}": this server's port
                self.send_header(name, value.replace("{port}", str(host.port)))
            if answer.length:
                self.send_header("Content-Length", str(len(answer.body)))
            else:
                self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(answer.body)
            except OSError:  # the client stopped reading (a body over the limit)
                pass

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host = MediaHost(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield host
    finally:
        stop.set()  # slow answers end now
        server.shutdown()
        server.server_close()
        thread.join(5)
