"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, and vLLM's
/tokenize and /detokenize."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from enum import Enum
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.core.backend import (
    BackendGeneration,
    ChoiceStep,
    LoadState,
    ModelBackend,
    PreparedPrompt,
    counted,
    with_media,
)
from lmserve.core.errors import LmserveError, invalid
from lmserve.core.events import Usage
from lmserve.core.lora import model_spec, selection_field
from lmserve.core.request import GenerationRequest, with_defaults
from lmserve.dialects.openai import adapter, encoder, tokenize
from lmserve.dialects.openai.chat_events import ChoiceCalls, event_deltas
from lmserve.dialects.openai.logprobs import StreamOffsets, chat_logprobs, with_logprobs
from lmserve.dialects.openai.responses.routes import make_router as responses_router
from lmserve.dialects.openai.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from lmserve.dialects.openai.tokenize import DetokenizeRequest, TokenizeRequest
from lmserve.http.routing import defaults_of, dialect_route, unless_disconnected
from lmserve.http.streaming import accepted, merge, sse, start_all, truncation_headers
from lmserve.models.registry import ModelRegistry

Job = tuple[GenerationRequest, PreparedPrompt]


def make_router(models: Callable[[], ModelRegistry], *,
                tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(encoder.error_body), tags=tags or ["OpenAI"])
    router.include_router(responses_router(models, tags=tags))

    @router.post("/v1/chat/completions", summary="Create a chat completion")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        view = models()
        service = view.get(body.model)
        gen = with_defaults(adapter.chat_request(body), defaults_of(view, service))
        gen = await with_media(service, gen)  # image URLs fetched
        prepared = service.prepare(gen)
        return await _respond(request, service, body.model, [(gen, prepared)], chat=True, echo=[],
                              stream=body.stream, include_usage=_include_usage(body),
                              continuous_usage=_continuous_usage(body))

    @router.post("/v1/completions", summary="Create a text completion")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        view = models()
        service = view.get(body.model)
        defaults = defaults_of(view, service)
        jobs = []
        for prompt in adapter.completion_prompts(body.prompt):
            gen = with_defaults(adapter.completion_request(body, prompt), defaults)
            jobs.append((gen, service.prepare(gen)))
        echo = [_echo_text(service, p) for _, p in jobs] if body.echo else []
        return await _respond(request, service, body.model, jobs, chat=False, echo=echo,
                              stream=body.stream, include_usage=_include_usage(body),
                              continuous_usage=_continuous_usage(body))

    @router.post("/v1/embeddings", summary="Create embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        service = models().get(body.model)
        adapters = service.adapters(body.model, selection_field(body.lora, "lora"))
        inputs = [p if isinstance(p, list) else service.tokenize(p)
                  for p in adapter.completion_prompts(body.input)]
        weights = service.require_ready().weights
        n_embd = weights.n_embd if weights is not None else None
        if body.dimensions is not None and n_embd is not None and body.dimensions > n_embd:
            raise invalid(f"dimensions must be at most {n_embd} for this model", param="dimensions")
        vectors = await service.embed(inputs, adapters)
        width = min((len(vec) for vec in vectors), default=0)  # no n_embd on an upstream's card
        if body.dimensions is not None and vectors and body.dimensions > width:
            raise invalid(f"dimensions must be at most {width} for this model",
                          param="dimensions")
        data = []
        for i, vec in enumerate(vectors):
            vec = vec[: body.dimensions] if body.dimensions else vec
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
            value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode() \
                if body.encoding_format == "base64" else [float(x) for x in vec]
            data.append({"object": "embedding", "index": i, "embedding": value})
        n_tokens = sum(len(t) for t in inputs)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @router.post("/tokenize", summary="Tokenize text (vLLM's and llama-server's route)")
    async def tokenize_text(body: TokenizeRequest) -> Any:
        view = models()
        service = view.get(body.model)
        gen = tokenize.chat_request(body)
        if gen is None:
            return tokenize.tokenize(service, body)
        gen = await with_media(service, with_defaults(gen, defaults_of(view, service)))
        chat = await counted(service, gen, service.prepare(gen))  # an upstream's: its count
        return tokenize.tokenize(service, body, chat)

    @router.post("/detokenize", summary="Token ids to text (vLLM's and llama-server's route)")
    async def detokenize_ids(body: DetokenizeRequest) -> Any:
        return tokenize.detokenize(models().get(body.model), body)

    @router.get("/v1/models", summary="List models")
    async def list_models() -> Any:
        registry = models()
        return {"object": "list",
                "data": [_model_card(s, name) for s in registry for name in _names(registry, s)]}

    @router.get("/v1/models/{model_id:path}", summary="Retrieve a model")
    async def get_model(model_id: str) -> Any:
        registry = models()
        return _model_card(registry.get(model_id), model_id)

    return router


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _continuous_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.continuous_usage_stats)


def _names(registry: ModelRegistry, service: ModelBackend) -> list[str]:
    """A model's names, then "<name>:<alias>" for each of its LoRA adapters."""
    names = registry.names(service)
    return [*names, *(f"{names[0]}:{spec.alias}" for spec in service.card.loras)]


def _model_card(service: ModelBackend, name: str) -> dict[str, Any]:
    card = service.card
    entry: dict[str, Any] = {"id": name, "object": "model", "created": card.created,
                             "owned_by": "lmserve", "status": card.status}
    if card.state == LoadState.LOADING:
        entry["progress"] = round(card.progress, 3)
    if card.error is not None:
        entry["error"] = card.error
    weights = card.weights
    if weights is not None:
        entry["meta"] = {"architecture": weights.architecture, "n_ctx": card.n_ctx,
                         "n_ctx_train": weights.n_ctx_train, "n_params": weights.n_params,
                         "size": weights.size_bytes, "n_vocab": weights.n_vocab,
                         "chat_template": card.has_template, "kv_layout": card.kv_layout,
                         "vision": card.vision, "audio": card.audio}
        if card.placement is not None:  # where the weights and the KV cache live
            entry["meta"]["placement"] = dataclasses.asdict(card.placement)
    lora = model_spec(name, card.loras, card.names)
    if lora is not None:  # vLLM's shape for an adapter: root is its file, parent the base
        entry.update(root=lora.path, parent=name.rpartition(":")[0],
                     lora={"alias": lora.alias, "scale": lora.scale})
    return entry


def _echo_text(service: ModelBackend, prepared: PreparedPrompt) -> str:
    if prepared.text is not None:
        return prepared.text
    return service.detokenize(prepared.tokens)


async def _respond(request: Request, service: ModelBackend, model: str, jobs: list[Job], *,
                   chat: bool, echo: list[str], stream: bool, include_usage: bool,
                   continuous_usage: bool = False) -> Any:
    """`chat`: each choice's parsed output (reasoning, tool calls) becomes its message."""
    n = jobs[0][0].n
    stop_ids = frozenset(jobs[0][0].stop_token_ids)  # the same for every prompt
    generations = start_all(service, jobs)  # refusals (context, capacity) happen here
    headers = truncation_headers(max(prepared.dropped_messages for _, prepared in jobs))
    if stream:
        await accepted(generations)  # an upstream's refusal is a status, not a stream error
        # With logprobs, each choice's echo waits for its prompt logprobs (on its first step).
        scored_echo = bool(echo) and jobs[0][0].prompt_logprobs is not None
        running = encoder.RunningUsage([len(prepared.tokens) for _, prepared in jobs], n) \
            if continuous_usage else None
        return StreamingResponse(_stream(generations, n, model, chat, echo, include_usage,
                                         scored_echo, running, stop_ids),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    collected = await unless_disconnected(request, _collect(generations, n, stop_ids))
    if collected.failure is not None:  # nothing sent yet: the failure's own status
        raise collected.failure.error()
    for i, text in enumerate(echo):
        for j in range(n):
            choice = collected.choices.get(i * n + j)
            if choice is not None:
                choice.text = text + choice.text
    if chat:
        return JSONResponse(encoder.chat_completion(model, collected, collected.usage),
                            headers=headers)
    return JSONResponse(encoder.text_completion(model, collected, collected.usage))


async def _collect(generations: list[BackendGeneration], n: int,
                   stop_ids: frozenset[int] = frozenset()) -> encoder.Collected:
    collected = encoder.Collected(stop_ids=stop_ids)
    async for job_index, steps in merge(generations):
        for step in steps:
            collected.add(step, job_index * n + step.index, job_index)
    return collected


async def _stream(generations: list[BackendGeneration], n: int, model: str, chat: bool,
                  echo: list[str], include_usage: bool, scored_echo: bool = False,
                  running: encoder.RunningUsage | None = None,
                  stop_ids: frozenset[int] = frozenset()) -> AsyncIterator[bytes]:
    """`scored_echo`: the echo goes out with the prompt's logprobs, on each choice's first
    step, instead of up front. `running`: every chunk carries the usage so far; where only
    the backend's counts tell the prompt's length (an upstream), the role and echo chunks
    wait for the first step, which brings them."""
    enc = encoder.ChunkEncoder(model, chat=chat, include_usage=include_usage, running=running,
                               stop_ids=stop_ids)
    parsed = _ParsedChoices(enc) if chat else None
    groups: list[list[Usage]] = [[] for _ in generations]
    offsets = StreamOffsets()

    def preamble() -> Iterator[bytes]:
        if chat:
            for j in range(n):
                yield sse(enc.role(j))
        for i, text in enumerate([] if scored_echo else echo):
            for j in range(n):
                yield sse(enc.delta(i * n + j, text, None))

    waiting = running is not None and not running.known
    if not waiting:
        for line in preamble():
            yield line
    try:
        async for job_index, steps in merge(generations):
            for step in steps:
                step.raise_failure()  # the stream has started: the error goes inside it
                if step.usage is not None:
                    groups[job_index].append(step.usage)
                index = job_index * n + step.index
                if running is not None:
                    if waiting:
                        running.learn_prompt(index, step)
                        for line in preamble():
                            yield line
                        waiting = False
                    running.add(index, step)
                if parsed is not None:
                    for chunk in parsed.chunks(index, step):
                        yield sse(chunk)
                    continue
                if scored_echo and step.prompt_logprobs is not None:
                    text = echo[job_index]
                    yield sse(enc.delta(index, text, None,
                                        offsets.chunk(index, step.prompt_logprobs, text)))
                if step.text or step.finished or step.logprobs:
                    yield sse(enc.delta(index, step.text, step.finish_reason,
                                        offsets.chunk(index, step.logprobs), step.stop_match))
        if include_usage:
            yield sse(enc.usage(encoder.total_usage(groups)))
    except LmserveError as exc:  # the stream has started: the error travels inside it
        yield sse(encoder.error_body(exc))
    yield sse("[DONE]")


class _ParsedChoices:
    """Chat stream chunks from each choice's parsed output (reasoning, text, tool calls)."""

    def __init__(self, enc: encoder.ChunkEncoder) -> None:
        self.enc = enc
        self.calls = ChoiceCalls()

    def chunks(self, index: int, step: ChoiceStep) -> list[dict[str, Any]]:
        self.calls.note(index, step.events)
        chunks = [self.enc.choice_chunk(index, delta, None) for delta in event_deltas(step.events)]
        if step.finished:
            reason = self.calls.finish_reason(index, encoder.finish_reason(step.finish_reason))
            chunks.append(self.enc.choice_chunk(index, {}, reason, stop=step.stop_match))
        return with_logprobs(chunks, chat_logprobs(step.logprobs) if step.logprobs else None,
                             lambda: self.enc.choice_chunk(index, {}, None))
