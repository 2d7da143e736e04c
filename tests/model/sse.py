"""A small SSE reader for tests: frames with id, event and data, and comment lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Frame:
    id: int | None
    event: str
    data: Any


def read_sse(client: httpx.Client, url: str, *, last_event_id: int | None = None,
             stop_after: int | None = None, timeout: float = 120) -> tuple[list[Frame], int]:
    """Read frames until the server closes (or `stop_after` frames); returns frames and the
    number of comment lines (heartbeats) seen."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    frames: list[Frame] = []
    comments = 0
    with client.stream("GET", url, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                comments += 1
            elif line == "":
                if current:
                    frames.append(Frame(int(current["id"]) if "id" in current else None,
                                        current.get("event", "message"),
                                        json.loads(current.get("data", "null"))))
                    current = {}
                    if stop_after is not None and len(frames) >= stop_after:
                        break
            else:
                key, _, value = line.partition(":")
                current[key] = value[1:] if value.startswith(" ") else value
    return frames, comments
