"""Backend for any OpenAI-compatible HTTP server (lmserve, llama.cpp's server, vLLM, ...)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from lmserve.bench.base import BackendError, BenchRequest, Chunk

Endpoint = Literal["completions", "chat"]


class SSEDecoder:
    """Incremental server-sent-events decoder: feed it lines, get each event's data."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its newline); return an event's data when one completes."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event:, id:, retry: are irrelevant here

    def flush(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


@dataclass(frozen=True)
class StreamEvent:
    """What one streamed JSON event carries for the benchmark."""

    text: str
    usage: dict[str, Any] | None
    finish_reason: str | None


def parse_event(data: str, endpoint: Endpoint) -> tuple[str, dict[str, Any] | None]:
    """Extract (delta text, usage or None) from one streamed JSON event."""
    event = read_event(data, endpoint)
    return event.text, event.usage


def read_event(data: str, endpoint: Endpoint) -> StreamEvent:
    """Decode one streamed JSON event: delta text, usage, and a choice's finish_reason."""
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise BackendError(f"malformed stream event: {data[:200]!r}") from exc
    if not isinstance(event, dict):
        raise BackendError(f"unexpected stream event: {data[:200]!r}")
    if "error" in event:
        err = event["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise BackendError(f"error event: {msg}")
    text, finish = "", None
    for choice in event.get("choices") or []:
        finish = choice.get("finish_reason") or finish
        if endpoint == "chat":
            delta = choice.get("delta") or {}
            # reasoning models stream their thinking separately; it is generated output too
            text += (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        else:
            text += choice.get("text") or ""
    usage = event.get("usage")
    return StreamEvent(text, usage if isinstance(usage, dict) else None, finish)


def api_root(base_url: str) -> str:
    """Normalise 'http://host:8080', '.../' or '.../v1' to 'http://host:8080/v1'."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


class OpenAIHTTPBackend:
    """Streams /v1/completions or /v1/chat/completions over SSE.

    Every event with non-empty text becomes one Chunk(n_tokens=1). When the server sends
    usage (requested with stream_options.include_usage), a final usage Chunk
    (Chunk.total_tokens = usage.completion_tokens) makes that the request's token count.
    A server that sends no usage but ends with finish_reason "length" generated exactly
    max_tokens tokens, so that becomes the count (some servers send several tokens' text in
    one event, or hold text back, so counting events would undercount).
    `timeout` (seconds, None = never) applies to connect, each read, write and waiting for
    a pooled connection; the default never cuts a long generation.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key: str | None = None,
        endpoint: Endpoint = "completions",
        *,
        max_connections: int = 16,
        timeout: float | None = None,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', not {endpoint!r}")
        self.name = f"openai-http:{endpoint}"
        self.model = model
        self.endpoint: Endpoint = endpoint
        self.extra_body = dict(extra_body or {})
        self._path = "/completions" if endpoint == "completions" else "/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=api_root(base_url),
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    def body(self, req: BenchRequest) -> dict[str, Any]:
        """The JSON body sent for `req`."""
        body: dict[str, Any] = {
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": req.max_tokens,
        }
        if self.model:
            body["model"] = self.model
        if req.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        body.update(self.extra_body)
        return body

    async def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]:
        usage: dict[str, Any] | None = None
        finish: str | None = None
        async for event in self._events(req):
            if event.text:
                yield Chunk(n_tokens=1, text=event.text)
            usage = event.usage or usage
            finish = event.finish_reason or finish
        if usage is not None and isinstance(usage.get("completion_tokens"), int):
            prompt_tokens = usage.get("prompt_tokens")
            yield Chunk(
                n_tokens=0,
                text="",
                total_tokens=usage["completion_tokens"],
                prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
            )
        elif finish == "length":
            yield Chunk(n_tokens=0, text="", total_tokens=req.max_tokens)

    async def _events(self, req: BenchRequest) -> AsyncIterator[StreamEvent]:
        decoder = SSEDecoder()
        async with self._client.stream("POST", self._path, json=self.body(req)) as resp:
            if resp.status_code >= 400:
                raw = (await resp.aread()).decode("utf-8", "replace")
                raise BackendError(f"HTTP {resp.status_code}: {raw[:500]}", resp.status_code)
            async for line in resp.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                if data.strip() == "[DONE]":
                    return
                yield read_event(data, self.endpoint)
            data = decoder.flush()  # stream ended without a blank line or [DONE]
            if data is not None and data.strip() != "[DONE]":
                yield read_event(data, self.endpoint)

    async def complete(self, req: BenchRequest) -> dict[str, Any]:
        """Send `req` without streaming and return the response body (e.g. to read `usage`)."""
        body = {k: v for k, v in self.body(req).items() if k != "stream_options"}
        resp = await self._client.post(self._path, json={**body, "stream": False})
        if resp.status_code >= 400:
            raise BackendError(f"HTTP {resp.status_code}: {resp.text[:500]}", resp.status_code)
        reply: dict[str, Any] = resp.json()
        return reply

    async def list_models(self) -> list[str]:
        """Model ids from GET /v1/models."""
        resp = await self._client.get("/models")
        if resp.status_code >= 400:
            raise BackendError(f"HTTP {resp.status_code}: {resp.text[:500]}", resp.status_code)
        return [m["id"] for m in resp.json().get("data", []) if "id" in m]

    async def aclose(self) -> None:
        await self._client.aclose()
