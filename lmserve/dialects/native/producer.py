"""Generations that outlive their HTTP request: frames go to a stream store, readers follow.

POST stream/ starts a producer task; each GET stream/{id}/ follows the stored frames, so a
reader that disconnects and comes back (Last-Event-ID) loses and repeats nothing, and a reader
leaving never cancels the generation. Only cancel() (DELETE stream/{id}/) does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from lmserve.chat.tools import StreamParser
from lmserve.chat.turn import step_events
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import CHANNEL_REASONING, FINISH_CANCELLED, FINISH_ERROR, ChatEvent, \
    TextDelta, TokenOutput, Usage
from lmserve.dialects.native.encoder import Blocks, Frame, FrameEncoder
from lmserve.engine.client import Generation
from lmserve.stores import StreamState, StreamStore

log = logging.getLogger("lmserve.native")

PROGRESS_EVERY = 32  # output tokens between message.delta usage frames


class ReplyParser:
    """Generated text -> chat events (reasoning, text, tool calls) through the chat parser.

    Reasoning is always kept out of the answer; it is shown only when asked for."""

    def __init__(self, parser: StreamParser, show_reasoning: bool) -> None:
        self.parser, self.show = parser, show_reasoning

    def step(self, text: str, finished: bool) -> list[ChatEvent]:
        events = step_events(self.parser, text, finished)
        return [e for e in events if self.show or not isinstance(e, TextDelta)
                or e.channel != CHANNEL_REASONING]


async def collect(generation: Generation, reply: ReplyParser
                  ) -> tuple[Blocks, str | None, Usage]:
    """Run a generation to the end; its blocks, the finish reason, usage."""
    blocks, finish, usage = Blocks(), None, Usage()
    try:
        async for outputs in generation:
            for out in outputs:
                if out.finish_reason == FINISH_ERROR:
                    raise LmserveError(ErrorKind.INTERNAL, f"generation failed: {out.error}")
                blocks.add_events(reply.step(out.text, out.finished))
                if out.finished:
                    finish, usage = out.finish_reason, out.usage or usage
    finally:
        generation.close()
    return blocks, finish, usage


class StreamProducers:
    """The running producers of this process, by stream id."""

    def __init__(self, store: Callable[[], StreamStore]) -> None:
        self._store = store
        self._tasks: dict[str, tuple[asyncio.Task[None], Generation]] = {}

    @property
    def store(self) -> StreamStore:
        return self._store()

    async def start(self, generation: Generation, reply: ReplyParser, model: str,
                    n_prompt: int, truncated: int = 0) -> str:
        """`truncated`: the oldest messages dropped to fit the context (in message.start)."""
        ident = str(uuid.uuid4())
        await self.store.create(ident, {"model": model})
        encoder = FrameEncoder(ident, model, int(time.time()), truncated)
        task = asyncio.create_task(self._produce(ident, generation, reply, encoder, n_prompt),
                                   name=f"native-stream-{ident}")
        self._tasks[ident] = (task, generation)
        task.add_done_callback(lambda _: self._tasks.pop(ident, None))
        return ident

    def cancel(self, ident: str) -> bool:
        """Cancel a running generation of this process; False if none runs here."""
        entry = self._tasks.get(ident)
        if entry is None:
            return False
        entry[1].close()  # the engine finishes it as cancelled; the producer writes the end
        return True

    async def close(self) -> None:
        for task, generation in list(self._tasks.values()):
            generation.close()
            task.cancel()
        await asyncio.gather(*(t for t, _ in self._tasks.values()), return_exceptions=True)

    async def _produce(self, ident: str, generation: Generation, reply: ReplyParser,
                       encoder: FrameEncoder, n_prompt: int) -> None:
        usage = Usage(prompt_tokens=n_prompt)
        state = StreamState.COMPLETED
        try:
            await self._emit(ident, encoder.start())
            async for outputs in generation:
                for out in outputs:
                    usage = await self._on_output(ident, out, reply, encoder, usage)
                    if out.finish_reason == FINISH_CANCELLED:
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

    async def _on_output(self, ident: str, out: TokenOutput, reply: ReplyParser,
                         encoder: FrameEncoder, usage: Usage) -> Usage:
        failed = out.finish_reason == FINISH_ERROR
        frames: list[Frame] = encoder.events(reply.step(out.text, out.finished and not failed))
        if failed:
            await self._emit(ident, frames)
            raise LmserveError(ErrorKind.INTERNAL, f"generation failed: {out.error}")
        if out.finished:
            usage = out.usage or usage
            frames += encoder.finish(out.finish_reason, usage)
        else:
            before = usage.completion_tokens
            usage = Usage(usage.prompt_tokens, before + len(out.token_ids), usage.cached_tokens)
            if usage.completion_tokens // PROGRESS_EVERY > before // PROGRESS_EVERY:
                frames += encoder.progress(usage)
        await self._emit(ident, frames)
        return usage

    async def _emit(self, ident: str, frames: list[Frame]) -> None:
        for event, data in frames:
            await self.store.append(ident, event, json.dumps(data, ensure_ascii=False,
                                                             separators=(",", ":")))


async def sse_frames(store: StreamStore, ident: str, after: int, heartbeat: float
                     ) -> AsyncIterator[bytes]:
    async for frame in store.follow(ident, after, heartbeat=heartbeat):
        if frame is None:
            yield b": heartbeat\n\n"
        else:
            yield f"id: {frame.id}\nevent: {frame.event}\ndata: {frame.data}\n\n".encode()

