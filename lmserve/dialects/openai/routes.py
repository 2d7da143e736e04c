"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.events import FINISH_ERROR, TokenOutput, Usage
from lmserve.core.request import GenerationRequest
from lmserve.dialects.openai import adapter, encoder
from lmserve.dialects.openai.schema import (ChatCompletionRequest, CompletionRequest,
                                            EmbeddingRequest)
from lmserve.http.routing import dialect_route, unless_disconnected
from lmserve.models.registry import ModelRegistry
from lmserve.service import ModelService, PreparedPrompt

Job = tuple[GenerationRequest, PreparedPrompt]


def make_router(models: Callable[[], ModelRegistry], *, tags: list[str] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(encoder.error_body), tags=tags or ["OpenAI"])

    @router.post("/v1/chat/completions", summary="Create a chat completion")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        service = models().get(body.model)
        gen = adapter.chat_request(body)
        job = (gen, service.prepare(gen))
        return await _respond(request, service, body.model, [job], chat=True, echo=[],
                              stream=body.stream,
                              include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @router.post("/v1/completions", summary="Create a text completion")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        service = models().get(body.model)
        jobs = []
        for prompt in adapter.completion_prompts(body.prompt):
            gen = adapter.completion_request(body, prompt)
            jobs.append((gen, service.prepare(gen)))
        echo = [_echo_text(service, p) for _, p in jobs] if body.echo else []
        return await _respond(request, service, body.model, jobs, chat=False, echo=echo,
                              stream=body.stream,
                              include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @router.post("/v1/embeddings", summary="Create embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        service = models().get(body.model)
        inputs = [p if isinstance(p, list) else service.tokenize(p)
                  for p in adapter.completion_prompts(body.input)]
        n_embd = service.require_ready().info.n_embd
        if body.dimensions is not None and body.dimensions > n_embd:
            raise invalid(f"dimensions must be at most {n_embd} for this model", param="dimensions")
        vectors = await service.embed(inputs)
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

    @router.get("/v1/models", summary="List models")
    async def list_models() -> Any:
        registry = models()
        return {"object": "list",
                "data": [_model_card(s, name) for s in registry for name in registry.names(s)]}

    @router.get("/v1/models/{model_id:path}", summary="Retrieve a model")
    async def get_model(model_id: str) -> Any:
        registry = models()
        return _model_card(registry.get(model_id), model_id)

    return router


def _model_card(service: ModelService, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": service.created,
                            "owned_by": "lmserve", "status": service.state}
    if service.model is not None:
        info = service.model.info
        card["meta"] = {"architecture": info.architecture, "n_ctx": service.n_ctx,
                        "n_ctx_train": info.n_ctx_train, "n_params": info.n_params,
                        "size": info.size_bytes, "n_vocab": info.n_vocab,
                        "chat_template": info.chat_template is not None}
    return card


def _echo_text(service: ModelService, prepared: PreparedPrompt) -> str:
    if prepared.text is not None:
        return prepared.text
    return service.require_ready().detokenize(prepared.tokens)


async def _generate_all(service: ModelService, jobs: list[Job]
                        ) -> AsyncIterator[tuple[int, list[TokenOutput]]]:
    """Run every (prompt) job concurrently; yield (job index, step outputs) as they come."""
    if len(jobs) == 1:
        gen, prepared = jobs[0]
        async for outs in service.generate(gen, prepared):
            yield 0, outs
        return
    queue: asyncio.Queue[tuple[int, list[TokenOutput]] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        try:
            async for outs in service.generate(job[0], job[1]):
                queue.put_nowait((i, outs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait(exc)
            return
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def _respond(request: Request, service: ModelService, model: str, jobs: list[Job], *,
                   chat: bool, echo: list[str], stream: bool, include_usage: bool) -> Any:
    n = jobs[0][0].n
    if stream:
        return StreamingResponse(_stream(service, model, jobs, chat, echo, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collected = await unless_disconnected(request, _collect(service, jobs, n))
    if collected.error:
        raise LmserveError(ErrorKind.INTERNAL, f"generation failed: {collected.error}")
    for i, text in enumerate(echo):
        for j in range(n):
            choice = collected.choices.get(i * n + j)
            if choice is not None:
                choice.text = text + choice.text
    body = (encoder.chat_completion if chat else encoder.text_completion)(model, collected,
                                                                          collected.usage)
    return JSONResponse(body)


async def _collect(service: ModelService, jobs: list[Job], n: int) -> encoder.Collected:
    collected = encoder.Collected()
    async for job_index, outs in _generate_all(service, jobs):
        for out in outs:
            collected.add(out, job_index * n + out.index, job_index)
    return collected


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                            separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _stream(service: ModelService, model: str, jobs: list[Job], chat: bool,
                  echo: list[str], include_usage: bool) -> AsyncIterator[bytes]:
    enc = encoder.ChunkEncoder(model, chat=chat, include_usage=include_usage)
    n = jobs[0][0].n
    groups: list[list[Usage]] = [[] for _ in jobs]
    if chat:
        for j in range(n):
            yield _sse(enc.role(j))
    for i, text in enumerate(echo):
        for j in range(n):
            yield _sse(enc.delta(i * n + j, text, None))
    try:
        async for job_index, outs in _generate_all(service, jobs):
            for out in outs:
                if out.finish_reason == FINISH_ERROR:
                    raise LmserveError(ErrorKind.INTERNAL, f"generation failed: {out.error}")
                if out.usage is not None:
                    groups[job_index].append(out.usage)
                if out.text or out.finished:
                    yield _sse(enc.delta(job_index * n + out.index, out.text, out.finish_reason))
        if include_usage:
            yield _sse(enc.usage(encoder.total_usage(groups)))
    except LmserveError as exc:  # the stream has started: the error travels inside it
        yield _sse(encoder.error_body(exc))
    yield _sse("[DONE]")
