"""Input items: a request's own items in the shape they are stored and listed in, and the chat
messages a conversation of items becomes.

A string input is one user message. Every item gets an id (the client's, or a new one) and a
status, and message content becomes a list of parts, as OpenAI lists input items. Function
calls join the assistant turn they follow (one message with `tool_calls`, which is how chat
templates expect them); their outputs become `tool` messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.request import ChatMessage
from lmserve.dialects.openai.responses.schema import JSON, new_id

_PART_TYPE = {"user": "input_text", "system": "input_text", "developer": "input_text",
              "assistant": "output_text"}
_STATUSES = ("in_progress", "completed", "incomplete")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")


def output_text_part(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def text_part(kind: str, text: str) -> JSON:
    return output_text_part(text) if kind == "output_text" else {"type": kind, "text": text}


def own_items(raw: str | list[Any]) -> list[JSON]:
    """The request's input as stored items (ids and statuses filled in)."""
    if isinstance(raw, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user",
                 "content": [text_part("input_text", raw)], "status": "completed"}]
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def check_unique_ids(items: list[JSON]) -> None:
    """Item ids are the pagination cursors of input_items, so a conversation repeats none."""
    seen: set[str] = set()
    for item in items:
        if item["id"] in seen:
            raise invalid(f"Duplicate item found with id {item['id']}. Remove duplicate items "
                          "from your input and try again.", param="input")
        seen.add(item["id"])


def _item(item: Any, param: str) -> JSON:
    if not isinstance(item, dict):
        raise invalid(f"{param} must be an object", param=param)
    kind = item.get("type", "message" if "role" in item else None)
    builder = _BUILDERS.get(kind)  # type: ignore[arg-type]
    if builder is not None:
        return builder(item, param)
    if kind == "item_reference":
        raise LmserveError(ErrorKind.UNSUPPORTED, f"{param}: item references are not supported; "
                           "send the item itself, or chain with previous_response_id",
                           param=f"{param}.type", code="unsupported_value")
    raise invalid(f"{param}.type: input items of type {kind!r} are not supported; send "
                  "message, function_call or function_call_output items", param=f"{param}.type")


def _message(item: JSON, param: str) -> JSON:
    role = item.get("role")
    if role not in _PART_TYPE:
        raise invalid(f"{param}.role must be one of user, assistant, system or developer",
                      param=f"{param}.role")
    return {"id": _id(item, "msg", param), "type": "message", "role": role,
            "content": _parts(item.get("content"), role, f"{param}.content"),
            "status": _status(item, param)}


def _parts(content: Any, role: str, param: str) -> list[JSON]:
    kind = _PART_TYPE[role]
    if isinstance(content, str):
        return [text_part(kind, content)]
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of content parts", param=param)
    return [_part(part, role, kind, f"{param}[{j}]") for j, part in enumerate(content)]


def _part(part: Any, role: str, kind: str, param: str) -> JSON:
    part_type = part.get("type") if isinstance(part, dict) else None
    if part_type in _MEDIA_PARTS:
        raise invalid(f"{param}: {part_type} is not supported; this model reads text only",
                      param=f"{param}.type", code="unsupported_content")
    if role == "assistant" and part_type == "refusal":
        return {"type": "refusal", "refusal": _string(part, "refusal", param)}
    if part_type != kind:
        allowed = "output_text or refusal" if role == "assistant" else "input_text"
        raise invalid(f"{param}.type: {part_type!r} parts are not allowed here; use {allowed}",
                      param=f"{param}.type")
    return text_part(kind, _string(part, "text", param))


def _function_call(item: JSON, param: str) -> JSON:
    return {"id": _id(item, "fc", param), "type": "function_call",
            "call_id": _string(item, "call_id", param), "name": _string(item, "name", param),
            "arguments": _string(item, "arguments", param), "status": _status(item, param)}


def _function_call_output(item: JSON, param: str) -> JSON:
    output = item.get("output")
    if isinstance(output, list):
        output = [_part(part, "tool", "input_text", f"{param}.output[{j}]")
                  for j, part in enumerate(output)]
    elif not isinstance(output, str):
        raise invalid(f"{param}.output must be a string or a list of input_text parts",
                      param=f"{param}.output")
    return {"id": _id(item, "fco", param), "type": "function_call_output",
            "call_id": _string(item, "call_id", param), "output": output,
            "status": _status(item, param)}


_BUILDERS: dict[str, Callable[[JSON, str], JSON]] = {
    "message": _message, "function_call": _function_call,
    "function_call_output": _function_call_output}


def _string(item: JSON, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid(f"{param}.{key} is required and must be a string", param=f"{param}.{key}")
    return value


def _id(item: JSON, prefix: str, param: str) -> str:
    value = item.get("id")
    if value is None:
        return new_id(prefix)
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise invalid(f"{param}.id must be a string of 1 to 256 characters", param=f"{param}.id")
    return value


def _status(item: JSON, param: str) -> str:
    value = item.get("status")
    if value is None:
        return "completed"
    if value not in _STATUSES:
        raise invalid(f"{param}.status must be one of {', '.join(_STATUSES)}",
                      param=f"{param}.status")
    return str(value)


# ---- items -> chat messages -------------------------------------------------------------------

def chat_messages(instructions: str | None, items: list[JSON]) -> list[ChatMessage]:
    """The conversation as chat messages; instructions first, as the system message."""
    messages = [ChatMessage("system", instructions)] if instructions else []
    names: dict[str, str] = {}  # call_id -> function name, for the tool messages
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append(ChatMessage(role, _text(item["content"])))
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            _add_call(messages, {"id": item["call_id"], "type": "function",
                                 "function": {"name": item["name"],
                                              "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            output = item["output"]
            messages.append(ChatMessage("tool", output if isinstance(output, str)
                                        else _text(output), name=names.get(item["call_id"]),
                                        extra={"tool_call_id": item["call_id"]}))
    return messages


def _add_call(messages: list[ChatMessage], call: JSON) -> None:
    last = messages[-1] if messages else None
    if last is None or last.role != "assistant":
        messages.append(ChatMessage("assistant", "", extra={"tool_calls": [call]}))
        return
    calls = [*last.extra.get("tool_calls", []), call]
    messages[-1] = ChatMessage("assistant", last.content, last.name,
                               {**last.extra, "tool_calls": calls})


def _text(parts: list[JSON]) -> str:
    return "\n".join(part["refusal"] if part["type"] == "refusal" else part["text"]
                     for part in parts)


def turn_starts(items: list[JSON]) -> list[int]:
    """Where a truncated conversation may begin: the start, or any user message."""
    return [0, *(i for i, item in enumerate(items)
                 if i > 0 and item["type"] == "message" and item["role"] == "user")]
