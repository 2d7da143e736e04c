"""Input items: a request's own items in the shape they are stored and listed in, and the chat
messages a conversation of items becomes.

A string input is one user message. Every item gets an id (the client's, or a new one) and a
status, and message content becomes a list of parts, as OpenAI lists input items. Function
calls join the assistant turn they follow (one message with `tool_calls`, which is how chat
templates expect them); their outputs become `tool` messages. A reasoning item (this
server's own, given back) becomes the `reasoning_content` of the assistant turn it precedes,
which Hugging Face templates that render reasoning read; the others ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmserve.core.errors import ErrorKind, LmserveError, invalid, unsupported
from lmserve.core.images import ImageInput, audio_from_input, image_from_url, joined_offset
from lmserve.core.request import ChatMessage
from lmserve.dialects.openai.responses.schema import JSON, new_id

_PART_TYPE = {"user": "input_text", "system": "input_text", "developer": "input_text",
              "assistant": "output_text"}
_STATUSES = ("in_progress", "completed", "incomplete")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")


def output_text_part(text: str, logprobs: list[JSON] | None = None) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def reasoning_item(item_id: str, status: str, text: str | None) -> JSON:
    """A reasoning output item: the model's reasoning text; never a summary (none is made)."""
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content,
            "status": status}


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
                  "message, reasoning, function_call or function_call_output items",
                  param=f"{param}.type")


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
    if part_type == "input_image" and role == "user":
        return _image_part(part, param)
    if part_type == "input_audio" and role == "user":
        return _audio_part(part, param)
    if part_type in _MEDIA_PARTS:
        where = "by this server" if part_type == "input_file" else "outside user messages"
        raise invalid(f"{param}: {part_type} is not supported {where}",
                      param=f"{param}.type", code="unsupported_content")
    if role == "assistant" and part_type == "refusal":
        return {"type": "refusal", "refusal": _string(part, "refusal", param)}
    if part_type != kind:
        allowed = "output_text or refusal" if role == "assistant" else "input_text"
        raise invalid(f"{param}.type: {part_type!r} parts are not allowed here; use {allowed}",
                      param=f"{param}.type")
    return text_part(kind, _string(part, "text", param))


def _image_part(part: JSON, param: str) -> JSON:
    """Stored as sent; the media policy judges the URL when the turn is prepared."""
    if part.get("file_id") is not None:
        raise unsupported(f"{param}.file_id", "this server keeps no uploaded files; send "
                          "image_url (a data: URL or an allowed http(s) URL)")
    url, detail = part.get("image_url"), part.get("detail")
    image_from_url(url, f"{param}.image_url", detail=detail, detail_param=f"{param}.detail")
    return {"type": "input_image", "image_url": url, "file_id": None, "detail": detail or "auto"}


def _audio_part(part: JSON, param: str) -> JSON:
    """OpenAI's ResponseInputAudio shape, {"input_audio": {"data", "format"}}, as
    llama.cpp's server example takes it in Responses input (OpenAI's own message content
    lists only text, image and file parts); stored as sent, judged when the turn is
    prepared."""
    clip = part.get("input_audio")
    audio_from_input(clip, f"{param}.input_audio")
    assert isinstance(clip, dict)
    return {"type": "input_audio",
            "input_audio": {"data": clip["data"], "format": clip.get("format")}}


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


def _reasoning(item: JSON, param: str) -> JSON:
    if item.get("encrypted_content") is not None:
        raise unsupported(f"{param}.encrypted_content", "this server writes no encrypted "
                          "reasoning and cannot read another's; send the item's content")
    summary = _texts(item.get("summary", []), "summary_text", f"{param}.summary")
    content = _texts(item.get("content") or [], "reasoning_text", f"{param}.content")
    return {"id": _id(item, "rs", param), "type": "reasoning", "summary": summary,
            "content": content, "status": _status(item, param)}


def _texts(parts: Any, kind: str, param: str) -> list[JSON]:
    """A reasoning item's summary or content: a list of {"type": kind, "text"} parts."""
    if not isinstance(parts, list):
        raise invalid(f"{param} must be a list of {kind} parts", param=param)
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != kind:
            raise invalid(f"{param}[{j}] must be a {kind} part", param=f"{param}[{j}].type")
        _string(part, "text", f"{param}[{j}]")
    return [{"type": kind, "text": part["text"]} for part in parts]


_BUILDERS: dict[str, Callable[[JSON, str], JSON]] = {
    "message": _message, "function_call": _function_call,
    "function_call_output": _function_call_output, "reasoning": _reasoning}


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
    reasoning: list[str] = []  # reasoning items waiting for the assistant turn they precede
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "reasoning":
            reasoning.append(_reasoning_text(item))
            continue
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text, images = _content(item["content"], f"input[{i}].content")
            extra = _reasoning_extra(reasoning) if role == "assistant" else {}
            messages.append(ChatMessage(role, text, images=images, extra=extra))
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            _add_call(messages, {"id": item["call_id"], "type": "function",
                                 "function": {"name": item["name"],
                                              "arguments": item["arguments"]}},
                      _reasoning_extra(reasoning))
        elif kind == "function_call_output":
            output = item["output"]
            messages.append(ChatMessage("tool", output if isinstance(output, str)
                                        else _content(output, "")[0],
                                        name=names.get(item["call_id"]),
                                        extra={"tool_call_id": item["call_id"]}))
        reasoning.clear()  # reasoning before a user or tool message has no turn to join
    return messages


def _reasoning_text(item: JSON) -> str:
    """The reasoning itself, or its summary when only that was given back."""
    parts = item["content"] or item["summary"]
    return "\n".join(part["text"] for part in parts)


def _reasoning_extra(reasoning: list[str]) -> dict[str, Any]:
    text = "\n".join(t for t in reasoning if t)
    return {"reasoning_content": text} if text else {}


def _add_call(messages: list[ChatMessage], call: JSON, extra: dict[str, Any]) -> None:
    """`extra`: the reasoning that precedes the call, for a turn that starts with it."""
    last = messages[-1] if messages else None
    if last is None or last.role != "assistant":
        messages.append(ChatMessage("assistant", "", extra={**extra, "tool_calls": [call]}))
        return
    calls = [*last.extra.get("tool_calls", []), call]
    merged = {**last.extra, "tool_calls": calls}
    if extra:  # reasoning between the turn's text and its call joins the turn's reasoning
        merged.update(_reasoning_extra([last.extra.get("reasoning_content", ""),
                                        extra["reasoning_content"]]))
    messages[-1] = ChatMessage("assistant", last.content, last.name, merged)


def _content(parts: list[JSON], param: str) -> tuple[str, tuple[ImageInput, ...]]:
    """The text parts joined, and the images between them; `param` names the parts (the
    index is the item's place in the conversation, history included)."""
    texts: list[str] = []
    images: list[ImageInput] = []
    for j, part in enumerate(parts):
        if part["type"] == "input_image":
            image = image_from_url(part["image_url"], f"{param}[{j}].image_url",
                                   detail=part["detail"])
            images.append(image.at(joined_offset(texts)))
        elif part["type"] == "input_audio":
            clip = audio_from_input(part["input_audio"], f"{param}[{j}].input_audio")
            images.append(clip.at(joined_offset(texts)))
        else:
            texts.append(part["refusal"] if part["type"] == "refusal" else part["text"])
    return "\n".join(texts), tuple(images)

