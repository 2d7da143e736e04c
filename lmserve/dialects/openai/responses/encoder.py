"""Pure translation: generated text -> the Response object, its stream events and list bodies.

One ResponseEvents per response numbers every event it makes (sequence_number from 0) and keeps
the response object up to date, so the final event and the stored record are the same object.
The event order of a text answer:

  response.created, response.in_progress, response.output_item.added,
  response.content_part.added, response.output_text.delta..., response.output_text.done,
  response.content_part.done, response.output_item.done,
  response.completed | response.incomplete   (or: error, response.failed)

A tool call is a function_call item: response.output_item.added (empty arguments),
response.function_call_arguments.delta..., response.function_call_arguments.done,
response.output_item.done. Reasoning is a reasoning item, before the message it leads to
(see steps.ReasoningWriter for its events). With logprobs asked for, each output_text delta
carries those of the tokens it shows, and the part and output_text.done carry them all.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from lmserve.core.backend import ChoiceStep
from lmserve.core.errors import LmserveError
from lmserve.core.events import (
    CHANNEL_REASONING,
    FINISH_LENGTH,
    ChatEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.dialects.openai.encoder import error_body, error_type
from lmserve.dialects.openai.responses.adapter import reasoning_echo
from lmserve.dialects.openai.responses.items import output_text_part
from lmserve.dialects.openai.responses.schema import JSON, ResponseCreate, new_id
from lmserve.dialects.openai.responses.steps import ReasoningWriter, StepTokens, part_done

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
        "reasoning": reasoning_echo(body.reasoning),
        "safety_identifier": body.safety_identifier, "service_tier": "default",
        "store": stored, "temperature": _or(body.temperature, 1.0),
        "text": {"format": (body.text or {}).get("format") or {"type": "text"},
                 "verbosity": "medium"},
        "tool_choice": body.tool_choice or "auto", "tools": tools_echo(body.tools),
        "top_logprobs": body.top_logprobs or 0, "top_p": _or(body.top_p, 1.0),
        "presence_penalty": _or(body.presence_penalty, 0.0),
        "frequency_penalty": _or(body.frequency_penalty, 0.0),
        "truncation": body.truncation or "disabled", "usage": None, "user": body.user,
        "metadata": body.metadata or {},
    }


def tools_echo(tools: list[JSON] | None) -> list[JSON]:
    """The tools as the response object lists them: every field of a function tool, null
    where the request left it out (the request's own extra keys are not echoed). The adapter
    has refused every tool that is not a function."""
    return [{"type": "function", "name": tool.get("name"),
             "description": tool.get("description"), "parameters": tool.get("parameters"),
             "strict": tool.get("strict")} for tool in tools or []]


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def usage_body(usage: Usage, reasoning_tokens: int = 0) -> JSON:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {
                "reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
            "total_tokens": usage.total_tokens}


class ResponseEvents:
    """The events of one response. `nested_errors`: the WebSocket shape of the error event
    ({"type": "error", "error": {...}}) instead of the SSE one (fields at the top level).

    Output items come in the order the model writes them: answer text opens a message item,
    a tool call closes it and adds a function_call item; text after a call opens a new
    message; reasoning text opens a reasoning item, which what follows it closes."""

    def __init__(self, head: JSON, *, nested_errors: bool = False) -> None:
        self.response = copy.deepcopy(head)
        self.nested_errors = nested_errors
        self.message_id = new_id("msg")
        self.text = ""  # the answer text of all messages (output_text)
        self.error: LmserveError | None = None
        self.output: list[JSON] = []
        self._sequence = 0
        self._message: int | None = None  # output index of the open message
        self._message_text = ""
        self._message_logprobs: list[JSON] = []
        self._calls: dict[int, int] = {}  # a call's index in the turn -> its output index
        self.tokens = StepTokens()
        self._reasoning = ReasoningWriter(self.output, self._event)

    def start(self) -> list[JSON]:
        return [self._event("response.created", response=self.snapshot()),
                self._event("response.in_progress", response=self.snapshot())]

    def chat(self, events: list[ChatEvent], step: ChoiceStep | None = None) -> list[JSON]:
        """The wire events of one step's parsed output (reasoning, answer text, tool calls);
        `step`: the choice step it came from (its tokens and their logprobs)."""
        if step is not None:
            self.tokens.step(step, events)
        out: list[JSON] = []
        for event in events:
            if isinstance(event, TextDelta) and event.text:
                if event.channel == CHANNEL_REASONING:
                    out += self._close_message("completed") + self._reasoning.delta(event.text)
                else:
                    out += self.delta(event.text, self.tokens.take())
            elif isinstance(event, ToolCallStart):
                self.tokens.drop()
                out += self._reasoning.close() + self._call_start(event)
            elif isinstance(event, ToolCallDelta):
                out += self._call_delta(event)
            elif isinstance(event, ToolCallEnd):
                out += self._call_end(event)
        return out

    def delta(self, text: str, logprobs: list[JSON] | None = None) -> list[JSON]:
        events = self._reasoning.close() + self._open()
        self.text += text
        self._message_text += text
        self._message_logprobs += logprobs or []
        events.append(self._event("response.output_text.delta", **self._where(), delta=text,
                                  logprobs=logprobs or []))
        return events

    def finish(self, finish_reason: str | None, usage: Usage) -> list[JSON]:
        """Close the output; the response is then final (final_event() announces it)."""
        status = "incomplete" if finish_reason == FINISH_LENGTH else "completed"
        events = self._reasoning.close(status)
        events += self._open() if not self.output else []
        events += self._close_message(status)
        for index in list(self._calls):
            events += self._call_end(ToolCallEnd(index, self._call(index)["arguments"], False))
        self.response.update(status=status, output=copy.deepcopy(self.output),
                             output_text=self.text,
                             usage=usage_body(usage, self.tokens.reasoning_tokens))
        if status == "completed":
            self.response["completed_at"] = int(time.time())
        else:
            # Also when the context filled up with no max_output_tokens set: the API allows
            # only max_output_tokens and content_filter, and OpenAI documents this very mapping
            # ("reach the context window limit or the max_output_tokens value you've set").
            # The echoed max_output_tokens (null: no limit) tells the two apart.
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        return events

    def fail(self, exc: LmserveError) -> list[JSON]:
        """The error event; the response is then failed (final_event() is response.failed)."""
        self.error = exc
        self._settle("failed")
        self.response["error"] = {"code": "server_error", "message": exc.message}
        kind = error_type(exc.kind)  # as the HTTP error body names it: server_error, ...
        fields = {"code": exc.code or kind, "message": exc.message, "param": exc.param}
        payload = {"type": kind, **fields}
        if self.nested_errors:
            return [self._event("error", error=payload)]
        # SSE: OpenAI's fields at the top level (what its clients read) and, for Open
        # Responses, the same again as an `error` object
        return [self._event("error", **fields, error=payload)]

    def cancel(self) -> JSON:
        """The response of a client that left before it finished."""
        self._settle("cancelled")
        return self.snapshot()

    def final_event(self) -> JSON:
        return self._event(_FINAL_EVENTS[self.response["status"]], response=self.snapshot())

    def snapshot(self) -> JSON:
        return copy.deepcopy(self.response)

    def _settle(self, status: str) -> None:
        """Items still being written end as incomplete."""
        self._reasoning.settle()
        if self._message is not None:
            self.output[self._message] = self._message_item("incomplete", [self._part()])
        for index in self._calls.values():
            self.output[index]["status"] = "incomplete"
        self.response.update(status=status, output=copy.deepcopy(self.output),
                             output_text=self.text)

    # ---- message items ----

    def _open(self) -> list[JSON]:
        if self._message is not None:
            return []
        if self.output:  # the first message keeps the id made up front
            self.message_id = new_id("msg")
        self._message, self._message_text, self._message_logprobs = len(self.output), "", []
        self.output.append(self._message_item("in_progress", []))
        return [self._event("response.output_item.added", output_index=self._message,
                            item=self._message_item("in_progress", [])),
                self._event("response.content_part.added", **self._where(),
                            part=output_text_part(""))]

    def _close_message(self, status: str) -> list[JSON]:
        if self._message is None:
            return []
        part = self._part()
        item = self._message_item(status, [part])
        events = part_done(self._event, "output_text", self._where(), part, item,
                           text=self._message_text, logprobs=part["logprobs"])
        self.output[self._message] = item
        self._message = None
        return events

    def _part(self) -> JSON:
        return output_text_part(self._message_text, self._message_logprobs)

    def _message_item(self, status: str, content: list[JSON]) -> JSON:
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": content}

    def _where(self) -> JSON:
        return {"item_id": self.message_id, "output_index": self._message, "content_index": 0}

    # ---- function_call items ----

    def _call(self, index: int) -> JSON:
        return self.output[self._calls[index]]

    def _call_start(self, event: ToolCallStart) -> list[JSON]:
        events = self._close_message("completed")
        self._calls[event.index] = len(self.output)
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                "arguments": "", "call_id": event.id, "name": event.name}
        self.output.append(item)
        events.append(self._event("response.output_item.added",
                                  output_index=self._calls[event.index], item=dict(item)))
        return events

    def _call_delta(self, event: ToolCallDelta) -> list[JSON]:
        item = self._call(event.index)
        item["arguments"] += event.arguments
        return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=self._calls[event.index], delta=event.arguments)]

    def _call_end(self, event: ToolCallEnd) -> list[JSON]:
        output_index = self._calls.pop(event.index)
        item = self.output[output_index]
        item.update(arguments=event.arguments,
                    status="completed" if event.complete else "incomplete")
        return [self._event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=output_index, name=item["name"],
                            arguments=event.arguments),
                self._event("response.output_item.done", output_index=output_index,
                            item=dict(item))]

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

