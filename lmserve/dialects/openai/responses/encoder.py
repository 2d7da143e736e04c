"""Pure translation: generated text -> the Response object, its stream events and list bodies.

One ResponseEvents per response numbers every event it makes (sequence_number from 0) and keeps
the response object up to date, so the final event and the stored record are the same object.
The event order of a text answer:

  response.created, response.in_progress, response.output_item.added,
  response.content_part.added, response.output_text.delta..., response.output_text.done,
  response.content_part.done, response.output_item.done,
  response.completed | response.incomplete   (or: error, response.failed)
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from lmserve.core.errors import LmserveError
from lmserve.core.events import FINISH_LENGTH, Usage
from lmserve.dialects.openai.encoder import error_body
from lmserve.dialects.openai.responses.items import output_text_part
from lmserve.dialects.openai.responses.schema import JSON, ResponseCreate, new_id

_FINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                 "failed": "response.failed"}


def response_head(body: ResponseCreate, *, response_id: str, created_at: int,
                  stored: bool) -> JSON:
    """The response object before any output: what the request asked for, echoed."""
    return {
        "id": response_id, "object": "response", "created_at": created_at,
        "status": "in_progress", "background": False, "completed_at": None, "error": None,
        "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "max_tool_calls": body.max_tool_calls,
        "model": body.model, "output": [], "output_text": "",
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": body.safety_identifier, "service_tier": "default",
        "store": stored, "temperature": _or(body.temperature, 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "top_logprobs": 0, "top_p": _or(body.top_p, 1.0),
        "truncation": body.truncation or "disabled", "usage": None, "user": body.user,
        "metadata": body.metadata or {},
    }


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def usage_body(usage: Usage) -> JSON:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


class ResponseEvents:
    """The events of one response. `nested_errors`: the WebSocket shape of the error event
    ({"type": "error", "error": {...}}) instead of the SSE one (fields at the top level)."""

    def __init__(self, head: JSON, *, nested_errors: bool = False) -> None:
        self.response = copy.deepcopy(head)
        self.nested_errors = nested_errors
        self.message_id = new_id("msg")
        self.text = ""
        self.error: LmserveError | None = None
        self._sequence = 0
        self._opened = False

    def start(self) -> list[JSON]:
        return [self._event("response.created", response=self.snapshot()),
                self._event("response.in_progress", response=self.snapshot())]

    def delta(self, text: str) -> list[JSON]:
        events = self._open()
        self.text += text
        events.append(self._event("response.output_text.delta", **self._where(), delta=text,
                                  logprobs=[]))
        return events

    def finish(self, finish_reason: str | None, usage: Usage) -> list[JSON]:
        """Close the message; the response is then final (final_event() announces it)."""
        status = "incomplete" if finish_reason == FINISH_LENGTH else "completed"
        events = self._open()
        part = output_text_part(self.text)
        item = self._message(status, [part])
        events += [
            self._event("response.output_text.done", **self._where(), text=self.text,
                        logprobs=[]),
            self._event("response.content_part.done", **self._where(), part=part),
            self._event("response.output_item.done", output_index=0, item=item)]
        self.response.update(status=status, output=[item], output_text=self.text,
                             usage=usage_body(usage))
        if status == "completed":
            self.response["completed_at"] = int(time.time())
        else:
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        return events

    def fail(self, exc: LmserveError) -> list[JSON]:
        """The error event; the response is then failed (final_event() is response.failed)."""
        self.error = exc
        self._settle("failed")
        self.response["error"] = {"code": "server_error", "message": exc.message}
        fields = {"code": exc.code or "server_error", "message": exc.message, "param": exc.param}
        if self.nested_errors:
            return [self._event("error", error={"type": "server_error", **fields})]
        return [self._event("error", **fields)]

    def cancel(self) -> JSON:
        """The response of a client that left before it finished."""
        self._settle("cancelled")
        return self.snapshot()

    def final_event(self) -> JSON:
        return self._event(_FINAL_EVENTS[self.response["status"]], response=self.snapshot())

    def snapshot(self) -> JSON:
        return copy.deepcopy(self.response)

    def _settle(self, status: str) -> None:
        output = [self._message("incomplete", [output_text_part(self.text)])] \
            if self._opened else []
        self.response.update(status=status, output=output, output_text=self.text)

    def _open(self) -> list[JSON]:
        if self._opened:
            return []
        self._opened = True
        return [self._event("response.output_item.added", output_index=0,
                            item=self._message("in_progress", [])),
                self._event("response.content_part.added", **self._where(),
                            part=output_text_part(""))]

    def _message(self, status: str, content: list[JSON]) -> JSON:
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": content}

    def _where(self) -> JSON:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> JSON:
        event = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return event


def sse(event: JSON) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def ws_error(exc: LmserveError) -> JSON:
    """A request refused over the WebSocket: the HTTP error body, as an error event."""
    return {"type": "error", "status": exc.kind.http_status, **error_body(exc)}


def deleted(response_id: str) -> JSON:
    return {"id": response_id, "object": "response.deleted", "deleted": True}

