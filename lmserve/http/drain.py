"""Graceful shutdown: uvicorn with lmserve's own signal handling.

The first SIGTERM or SIGINT starts a drain: every backend refuses new generations (503
`server_draining` with Retry-After, in the caller's dialect), readiness answers 503 while
liveness stays 200, and running requests go on for up to `drain_timeout` seconds. What is
still running then is ended with an error of kind DRAINING, which each stream carries as its
own in-stream error (a native stream's error frame lands in the stream store, so a reader on
another replica sees it). Once the streams have written their ends, uvicorn shuts down: the
listening socket closes, open responses finish, and the app's lifespan closes the store and
the models (which drains the disk cache's writer). The process exits 0.

A second SIGTERM or SIGINT ends the process at once, by that signal's default action.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import uvicorn
from starlette.types import ASGIApp

from lmserve.core.errors import ErrorKind, LmserveError

log = logging.getLogger("lmserve.drain")

SETTLE_SECONDS = 10.0  # after the drain: for cut streams to write their ends, and for the
#                        open responses to send their last bytes before connections close
POLL_SECONDS = 0.1  # how often the drain looks at the work left (uvicorn's own tick)


class Drainable(Protocol):
    """What the drain needs of the served models (models.registry.ModelRegistry)."""

    def drain(self) -> None: ...

    @property
    def busy(self) -> int: ...

    async def fail_all(self, error: LmserveError) -> None: ...


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains before it stops (see module doc).
    `writers`: how many background writers (native stream producers) are still writing."""

    def __init__(self, config: uvicorn.Config, models: Drainable, *, drain_timeout: float,
                 writers: Callable[[], int] = lambda: 0) -> None:
        super().__init__(config)
        self.models = models
        self.drain_timeout = drain_timeout
        self.writers = writers
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's signal handler (SIGINT, SIGTERM): drain first, then stop; or die now."""
        if self.draining or self._loop is None:
            name = signal.Signals(sig).name
            print(f"lmserve: {name} again: exiting now", file=sys.stderr, flush=True)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        self.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._task = asyncio.get_running_loop().create_task(self.drain(sig), name="lmserve-drain")

    async def drain(self, sig: int = signal.SIGTERM) -> None:
        try:
            await self._drain(sig)
        except Exception:  # never keep the server up because the drain failed
            log.exception("the drain failed; shutting down")
        finally:
            self.should_exit = True

    async def _drain(self, sig: int) -> None:
        loop = asyncio.get_running_loop()
        self.models.drain()
        log.warning("%s: draining (new requests get 503; %d running, up to %g s); "
                    "a second signal exits at once", signal.Signals(sig).name,
                    self.models.busy, self.drain_timeout)
        if not await self._settled(loop.time() + self.drain_timeout):
            log.warning("drain timeout: ending %d running request(s)", self.models.busy)
            await self.models.fail_all(LmserveError(
                ErrorKind.DRAINING, f"the server shut down before this generation finished "
                f"(drain timeout {self.drain_timeout:g} s)", code="server_draining"))
            if not await self._settled(loop.time() + SETTLE_SECONDS):
                log.warning("%d request(s) still open after the drain; closing anyway",
                            self.models.busy + self.writers())
        self.config.timeout_graceful_shutdown = int(SETTLE_SECONDS)
        log.info("drained; shutting down")

    async def _settled(self, deadline: float) -> bool:
        """Wait until no generation runs and no stream writer writes; False at the deadline."""
        loop = asyncio.get_running_loop()
        while self.models.busy or self.writers():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)
        return True


def serve(app: ASGIApp, models: Drainable, *, host: str, port: int, log_level: str,
          drain_timeout: float, writers: Callable[[], int] = lambda: 0,
          options: dict[str, Any] | None = None) -> int:
    """Run the app until a signal has drained it; the exit status (0 after a drain).
    `options`: more uvicorn.Config settings (TLS: ssl_certfile, ssl_keyfile; ws_max_size)."""
    # log_config None: lmserve configured logging (http.observe.configure_logging), and its
    # own access line replaces uvicorn's.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(SETTLE_SECONDS), log_config=None,
                            access_log=False, **(options or {}))
    server = DrainingServer(config, models, drain_timeout=drain_timeout, writers=writers)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure
