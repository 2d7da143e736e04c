"""A streaming OpenAI chat client that times one request: TTFT, the gaps between tokens,
the prompt tokens the server took from its cache, and what the answer said (text, tool calls),
so the next turn of a conversation can send it back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Result:
    """One streamed request, as the client saw it (times in seconds, monotonic clock)."""

    kind: str = ""  # the workload's label for it (turn, question, decoder, long, ...)
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between successive content chunks
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def itl_p99(self) -> float:
        return percentile(self.gaps, 99) if self.gaps else 0.0


# The model id each server answers to, by base URL (set once a server is up).
MODELS: dict[str, str] = {}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def chat(client: httpx.AsyncClient, base: str, body: dict[str, Any],
               kind: str = "") -> Result:
    """POST a streamed chat completion (usage asked for) and time its chunks."""
    body = {"model": MODELS.get(base, "default"), **body, "stream": True,
            "stream_options": {"include_usage": True}}
    out = Result(kind=kind, start=time.monotonic())
    calls: dict[int, dict[str, Any]] = {}
    for attempt in range(3):
        try:
            await _stream(client, base, body, out, calls)
            break
        except httpx.RemoteProtocolError as exc:
            # A pooled keep-alive connection the server closed as the request went out (cpp-
            # httplib closes one after 100 requests): nothing reached the server, so send it
            # again, as a browser or the openai client would; the clock keeps running.
            if out.ttft is not None or out.output_tokens or attempt == 2:
                out.error = f"{type(exc).__name__}: {exc}"
                break
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            break
    out.end = time.monotonic()
    out.tool_calls = [calls[i] for i in sorted(calls)]
    if out.ttft is None and out.error is None and out.output_tokens:
        out.ttft = out.end - out.start
    return out


async def _stream(client: httpx.AsyncClient, base: str, body: dict[str, Any], out: Result,
                  calls: dict[int, dict[str, Any]]) -> None:
    last: float | None = None
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            out.error = f"{resp.status_code}: {(await resp.aread())[:300]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.error = json.dumps(chunk["error"])[:300]
                continue
            if usage := chunk.get("usage"):
                out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                out.output_tokens = int(usage.get("completion_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                out.cached_tokens = int(details.get("cached_tokens") or 0)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                produced = bool(delta.get("content") or delta.get("tool_calls")
                                or delta.get("reasoning_content"))
                out.text += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(int(tc.get("index", 0)), {
                        "id": "", "type": "function",
                        "function": {"name": "", "arguments": ""}})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
                if produced:
                    now = time.monotonic()
                    if last is None:
                        out.ttft = now - out.start
                    else:
                        out.gaps.append(now - last)
                    last = now
