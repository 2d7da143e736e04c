"""One Responses turn, for HTTP and WebSocket alike: resolve the conversation, start the
generation, run it as events, and store the response before its final event leaves.

Durability: a stored response is written before response.completed (or the body) is sent, so
whatever a client was told has finished survives a crash. A client that leaves early cancels
the generation; the partial response is then stored with status "cancelled", so an id the
client saw in response.created still answers GET with what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lmserve.core.backend import BackendGeneration, ModelBackend, PreparedPrompt, with_media
from lmserve.core.caller import current_key, may_read
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.events import FINISH_CANCELLED, Usage
from lmserve.core.request import GenerationRequest, with_defaults
from lmserve.dialects.openai.responses import adapter, items
from lmserve.dialects.openai.responses.encoder import ResponseEvents, response_head
from lmserve.dialects.openai.responses.schema import JSON, ResponseCreate, new_id
from lmserve.http.routing import defaults_of
from lmserve.models.registry import ModelRegistry
from lmserve.stores import ResponseRecord, ResponseStore

log = logging.getLogger("lmserve.responses")

_PENDING_WRITES: set[asyncio.Task[None]] = set()


class HasResponseStore(Protocol):
    def responses(self) -> ResponseStore | None: ...


def storage_off(param: str) -> LmserveError:
    return invalid("response storage is off on this server (started with --store none): "
                   "responses are not kept, so none can be retrieved or chained",
                   param=param, code="storage_disabled")


def previous_not_found(response_id: str) -> LmserveError:
    return LmserveError(ErrorKind.NOT_FOUND,
                        f"Previous response with id '{response_id}' not found.",
                        param="previous_response_id", code="previous_response_not_found")


@dataclass
class Turn:
    body: ResponseCreate
    conversation: list[JSON]  # what the response is generated from: history + own input
    generation: BackendGeneration  # its steps come parsed: answer text, reasoning, tool calls
    events: ResponseEvents
    store: ResponseStore | None  # where the response goes; None when it is not kept
    truncated_messages: int = 0  # the oldest messages dropped to fit the context
    owner: str | None = None  # the name of the API key that creates it (None without keys)


async def begin(state: HasResponseStore, registry: ModelRegistry, body: ResponseCreate, *,
                nested_errors: bool = False) -> Turn:
    """Check, resolve and submit; every refusal happens here, before any event. The model's
    default parameters fill what the request left unset, and the response echoes them."""
    service = registry.get(body.model)
    adapter.check_request(body)
    store = state.responses()
    conversation = [*await _history(store, body.previous_response_id),
                    *items.own_items(body.input)]
    items.check_unique_ids(conversation)
    gen, prepared = await _prepare(service, body, conversation, defaults_of(registry, service))
    body = _echoed(body, gen)
    generation = service.start(gen, prepared)
    if body.truncation is None:  # the server's default decided: the response says which
        body = body.model_copy(update={"truncation": "auto" if prepared.truncating
                                       else "disabled"})
    keep = store if body.store is not False else None
    head = response_head(body, response_id=new_id("resp"), created_at=int(time.time()),
                         stored=keep is not None)
    return Turn(body, conversation, generation,
                ResponseEvents(head, nested_errors=nested_errors), keep,
                prepared.dropped_messages, current_key())


async def _history(store: ResponseStore | None, previous_id: str | None) -> list[JSON]:
    if previous_id is None:
        return []
    if store is None:
        raise storage_off("previous_response_id")
    record = await store.get(previous_id)
    if record is None or not may_read(record.owner):  # another key's: as if there were none
        raise previous_not_found(previous_id)
    return record.conversation()


def _echoed(body: ResponseCreate, gen: GenerationRequest) -> ResponseCreate:
    """The request as the response object echoes it: the sampling values and the output limit
    the generation runs with, a model's defaults included (the head fills what is None)."""
    s = gen.sampling
    return body.model_copy(update={
        "temperature": s.temperature, "top_p": s.top_p, "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty, "max_output_tokens": gen.max_tokens})


async def _prepare(service: ModelBackend, body: ResponseCreate, conversation: list[JSON],
                   defaults: Mapping[str, Any]) -> tuple[GenerationRequest, PreparedPrompt]:
    """The prompt of the conversation (its image URLs fetched) with the model's defaults
    filled in; truncation "auto" drops its oldest turns to fit the context (the service does
    it, see chat.overflow); the stored conversation stays whole, URLs and all."""
    messages = items.chat_messages(body.instructions, conversation)
    gen = with_defaults(adapter.generation_request(body, messages), defaults)
    gen = await with_media(service, gen)
    return gen, service.prepare(gen)


async def run(turn: Turn) -> AsyncGenerator[JSON, None]:
    """The events of the turn, ending with the final one; errors become error + failed."""
    events = turn.events
    settled = False
    try:
        for event in events.start():
            yield event
        finish, usage = None, Usage()
        async for steps in turn.generation:
            for step in steps:
                step.raise_failure()  # with its kind: the status, or the error event's type
                if step.finish_reason == FINISH_CANCELLED:  # aborted on the server's side
                    # (an abort route, another replica's cancel): the Responses API has no
                    # cancelled status for a response in the foreground, so it fails, with
                    # a retryable status rather than a server error
                    raise LmserveError(ErrorKind.UNAVAILABLE, "the request was cancelled on "
                                       "the server before it finished", code="request_cancelled")
                for event in events.chat(step.events, step):
                    yield event
                if step.finished:
                    finish, usage = step.finish_reason, step.usage or usage
        for event in events.finish(finish, usage):
            yield event
        await _persist(turn)
        settled = True
        yield events.final_event()
    except LmserveError as exc:
        settled = True
        for event in await _failed(turn, exc):
            yield event
    except Exception as exc:  # a bug: still end the stream properly
        log.exception("response %s failed", events.response["id"])
        settled = True
        error = LmserveError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}")
        for event in await _failed(turn, error):
            yield event
    finally:
        turn.generation.close()  # a client that left lands here: the engine stops the sequence
        if not settled:
            events.cancel()
            _in_background(_persist(turn))


async def collect(turn: Turn) -> JSON:
    """Run the turn to its end (non-streaming); the final response object."""
    async with contextlib.aclosing(run(turn)) as events:
        async for _ in events:
            pass
    if turn.events.error is not None:
        raise turn.events.error
    return turn.events.snapshot()


async def _failed(turn: Turn, exc: LmserveError) -> list[JSON]:
    events = turn.events.fail(exc)
    try:
        await _persist(turn)
    except Exception:
        log.exception("could not store failed response %s", turn.events.response["id"])
    return [*events, turn.events.final_event()]


async def _persist(turn: Turn) -> None:
    if turn.store is None:
        return
    response = turn.events.snapshot()
    try:
        await turn.store.put(ResponseRecord(
            id=response["id"], created_at=response["created_at"], model=turn.body.model,
            input_items=turn.conversation, response=response,
            previous_response_id=turn.body.previous_response_id,
            metadata=dict(turn.body.metadata or {}), owner=turn.owner))
    except LmserveError:
        raise
    except Exception as exc:
        raise LmserveError(ErrorKind.INTERNAL, f"the response could not be stored: "
                           f"{type(exc).__name__}: {exc}") from exc


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    """Start a write that must outlive a cancelled request (its awaits would be cancelled)."""
    task = asyncio.ensure_future(work)
    _PENDING_WRITES.add(task)
    task.add_done_callback(_written)


def _written(task: asyncio.Task[None]) -> None:
    _PENDING_WRITES.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("could not store a cancelled response: %s", task.exception())
