"""Generations that outlive their HTTP request: frames go to a stream store, readers follow.

POST stream/ starts a producer task; each GET stream/{id}/ follows the stored frames, so a
reader that disconnects and comes back (Last-Event-ID) loses and repeats nothing, and a reader
leaving never cancels the generation. Only cancel() (DELETE stream/{id}/) does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmserve.core.backend import BackendGeneration, ChoiceStep
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import CHANNEL_REASONING, FINISH_CANCELLED, ChatEvent, TextDelta, Usage
from lmserve.core.procs import pid_alive
from lmserve.dialects.native.encoder import Blocks, Frame, FrameEncoder
from lmserve.stores import ConflictError, StreamInfo, StreamState, StreamStore
from lmserve.stores.cluster import Cluster

log = logging.getLogger("lmserve.native")

PROGRESS_EVERY = 32  # output tokens between message.delta usage frames
ORPHAN_CHECK = 2.0  # seconds between a quiet reader's checks that the producer is still alive
CANCEL = "cancel_stream"  # the cluster message that cancels a stream where its producer runs


def visible(events: list[ChatEvent], show_reasoning: bool) -> list[ChatEvent]:
    """A step's parsed events as the reply shows them: reasoning is always kept out of the
    answer, and shown only when asked for."""
    return [e for e in events if show_reasoning or not isinstance(e, TextDelta)
            or e.channel != CHANNEL_REASONING]


async def collect(generation: BackendGeneration, show_reasoning: bool
                  ) -> tuple[Blocks, str | None, Usage]:
    """Run a generation to the end; its blocks, the finish reason, usage."""
    blocks, finish, usage = Blocks(), None, Usage()
    try:
        async for steps in generation:
            for step in steps:
                step.raise_failure()  # with its kind, so the status is the failure's
                blocks.add_events(visible(step.events, show_reasoning))
                if step.finished:
                    finish, usage = step.finish_reason, step.usage or usage
    finally:
        generation.close()
    return blocks, finish, usage


class StreamProducers:
    """The running producers of this process, by stream id."""

    def __init__(self, store: Callable[[], StreamStore],
                 cluster: Callable[[], Cluster] | None = None) -> None:
        """`cluster`: the replicas sharing the store (leases, cancels sent to the owner);
        without one, only this process."""
        self._store = store
        alone = Cluster()
        self._cluster = cluster or (lambda: alone)
        self._tasks: dict[str, tuple[asyncio.Task[None], BackendGeneration]] = {}
        # Written into each stream's meta, so a later reader can tell a stream whose producer
        # is gone (this process killed, or the store failed under it) from a live one.
        self.owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                                      "instance": uuid.uuid4().hex}
        self._ending: set[str] = set()

    @property
    def store(self) -> StreamStore:
        return self._store()

    @property
    def cluster(self) -> Cluster:
        return self._cluster()

    async def start(self, generation: BackendGeneration, show_reasoning: bool, model: str,
                    n_prompt: int, truncated: int = 0, *, key: str | None = None) -> str:
        """`show_reasoning`: stream the reasoning channel too; `truncated`: the oldest messages
        dropped to fit the context (in message.start); `key`: the name of the API key that
        starts it (only that key or an admin key may cancel it; None without keys)."""
        ident = str(uuid.uuid4())
        meta: dict[str, Any] = {"model": model, "owner": self.owner}
        if key is not None:
            meta["key"] = key
        await self.store.create(ident, meta)
        encoder = FrameEncoder(ident, model, int(time.time()), truncated)
        task = asyncio.create_task(self._produce(ident, generation, show_reasoning, encoder,
                                                 n_prompt),
                                   name=f"native-stream-{ident}")
        self._tasks[ident] = (task, generation)
        task.add_done_callback(lambda _: self._tasks.pop(ident, None))
        return ident

    @property
    def running(self) -> int:
        """Producers still writing frames (a drain waits for them before the store closes)."""
        return len(self._tasks)

    async def end_if_orphaned(self, info: StreamInfo) -> StreamInfo:
        """End a stream its producer left open, with an error frame and message.stop, so its
        readers do not wait for ever. Orphaned: produced by this process but no producer runs
        (its store writes failed), by a replica whose lease in the shared store ran out
        (killed, or cut off), or, where the store keeps no leases, by a process of this host
        that is gone (killed; a restart reads the stream from the same store). Without a
        lease, a stream of another host is left alone: its producer may be alive there."""
        if info.finished or info.id in self._ending or not await self._orphaned(info):
            return info
        if not await self.cluster.claim(f"orphan:{info.id}"):
            return info  # another replica's reader ends it; its frames come through the store
        self._ending.add(info.id)
        try:
            encoder = FrameEncoder(info.id, str(info.meta.get("model", "")), int(info.created_at))
            await self._emit(info.id, encoder.error(LmserveError(
                ErrorKind.INTERNAL, "the server process producing this stream stopped before it "
                "finished"), Usage()))
            await self.store.finish(info.id, StreamState.FAILED)
            log.warning("native stream %s: its producer is gone; ended it with an error", info.id)
        except ConflictError:
            pass  # it finished meanwhile
        finally:
            self._ending.discard(info.id)
        return await self.store.get(info.id) or info

    async def _orphaned(self, info: StreamInfo) -> bool:
        owner = info.meta.get("owner")
        if not isinstance(owner, dict):
            return False  # written before owners were recorded: cannot tell
        instance = owner.get("instance")
        if instance == self.owner["instance"]:
            return info.id not in self._tasks
        alive = await self.cluster.alive(instance) if isinstance(instance, str) else None
        if alive is not None:
            return not alive
        if owner.get("host") != self.owner["host"]:
            return False
        pid = owner.get("pid")
        return pid == self.owner["pid"] or not isinstance(pid, int) or not pid_alive(pid)

    def cancel(self, ident: str) -> bool:
        """Cancel a running generation of this process; False if none runs here."""
        entry = self._tasks.get(ident)
        if entry is None:
            return False
        entry[1].close()  # the engine finishes it as cancelled; the producer writes the end
        return True

    async def cancel_anywhere(self, info: StreamInfo) -> bool:
        """Cancel a stream's generation in this process, or send the cancel to the replica
        that runs it; False when no replica took it (none runs it, or its owner is not
        listening)."""
        if self.cancel(info.id):
            return True
        owner = info.meta.get("owner")
        instance = owner.get("instance") if isinstance(owner, dict) else None
        if not isinstance(instance, str) or instance == self.owner["instance"]:
            return False
        return await self.cluster.send(instance, {"kind": CANCEL, "id": info.id})

    async def on_message(self, message: dict[str, Any]) -> None:
        """A cluster message for the producers: a cancel sent by another replica."""
        if message.get("kind") == CANCEL and isinstance(message.get("id"), str):
            if not self.cancel(message["id"]):
                log.info("native stream %s: a cancel came for it, but it runs no more",
                         message["id"])

    async def close(self) -> None:
        for task, generation in list(self._tasks.values()):
            generation.close()
            task.cancel()
        await asyncio.gather(*(t for t, _ in self._tasks.values()), return_exceptions=True)

    async def _produce(self, ident: str, generation: BackendGeneration, show_reasoning: bool,
                       encoder: FrameEncoder, n_prompt: int) -> None:
        usage = Usage(prompt_tokens=n_prompt)
        state = StreamState.COMPLETED
        try:
            await self._emit(ident, encoder.start())
            async for steps in generation:
                for step in steps:
                    usage = await self._on_step(ident, step, show_reasoning, encoder, usage)
                    if step.finish_reason == FINISH_CANCELLED:
                        state = StreamState.CANCELLED
        except LmserveError as exc:
            state = StreamState.FAILED
            await self._emit(ident, encoder.error(exc, usage))
        except asyncio.CancelledError:
            state = StreamState.FAILED
            await asyncio.shield(self._emit(ident, encoder.error(
                LmserveError(ErrorKind.INTERNAL, "the server is shutting down"), usage)))
            raise
        except Exception as exc:  # a bug: still end the stream so no reader hangs
            log.exception("native stream %s failed", ident)
            state = StreamState.FAILED
            await self._emit(ident, encoder.error(
                LmserveError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}"), usage))
        finally:
            generation.close()
            await asyncio.shield(self.store.finish(ident, state))

    async def _on_step(self, ident: str, step: ChoiceStep, show_reasoning: bool,
                       encoder: FrameEncoder, usage: Usage) -> Usage:
        frames: list[Frame] = encoder.events(visible(step.events, show_reasoning))
        if step.failed:
            await self._emit(ident, frames)  # what was parsed before the failure goes out
            step.raise_failure()  # the error frame carries the failure's kind
        if step.finished:
            usage = step.usage or usage
            frames += encoder.finish(step.finish_reason, usage)
        else:
            before = usage.completion_tokens
            usage = Usage(usage.prompt_tokens, before + len(step.token_ids), usage.cached_tokens)
            if usage.completion_tokens // PROGRESS_EVERY > before // PROGRESS_EVERY:
                frames += encoder.progress(usage)
        await self._emit(ident, frames)
        return usage

    async def _emit(self, ident: str, frames: list[Frame]) -> None:
        for event, data in frames:
            await self.store.append(ident, event, json.dumps(data, ensure_ascii=False,
                                                             separators=(",", ":")))


async def sse_frames(producers: StreamProducers, ident: str, after: int, heartbeat: float
                     ) -> AsyncIterator[bytes]:
    """A stream's frames after `after` as SSE, with a comment every `heartbeat` quiet
    seconds. While it is quiet, the reader checks every ORPHAN_CHECK seconds that the stream's
    producer is alive (its lease, on a shared store), and ends an orphan with an error frame,
    so a reader of a killed replica's stream ends in bounded time instead of hanging."""
    store = producers.store
    check = min(heartbeat, ORPHAN_CHECK)
    quiet = 0.0
    async for frame in store.follow(ident, after, heartbeat=check):
        if frame is not None:
            quiet = 0.0
            yield f"id: {frame.id}\nevent: {frame.event}\ndata: {frame.data}\n\n".encode()
            continue
        info = await store.get(ident)
        if info is not None and not info.finished:
            await producers.end_if_orphaned(info)  # its frames come through follow next
        quiet += check
        if quiet >= heartbeat:
            quiet = 0.0
            yield b": heartbeat\n\n"

