"""Pure translation: Anthropic Messages wire models -> core.GenerationRequest.

Tool history (tool_use / tool_result blocks) becomes `tool_calls` and `tool` messages; the
service renders them through the chat template, or as the fallback tool prompt's text when the
template knows no tools. Earlier thinking travels as `reasoning_content`, which templates
without a reasoning channel drop, as Anthropic drops earlier thinking itself. Tools, tool_choice,
thinking and output_config are translated in anthropic.tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmserve.core.errors import invalid, unsupported
from lmserve.core.images import ImageInput, image_from_base64, image_from_url, joined_offset
from lmserve.core.lifecycle import keep_alive_seconds
from lmserve.core.request import ChatMessage, GenerationRequest, SamplingParams
from lmserve.dialects.anthropic.schema import ContentBlock, MessageIn, MessageRequest, MessagesBase
from lmserve.dialects.anthropic.tools import thinking, tool_fields
from lmserve.dialects.given import explicit

# Wire fields -> the neutral ones they set. max_tokens is required, so a default never
# replaces it.
_NAMES = {"stop_sequences": "stop"}


@dataclass
class Conversation:
    """Messages for the chat template; `prefill` is the start of the reply when the request
    ends with an assistant turn (the reply continues it and does not repeat it)."""

    messages: list[ChatMessage]
    prefill: str | None = None

    def fields(self) -> dict[str, Any]:
        """GenerationRequest fields: the messages, and a prefill as the final assistant
        message, continued (continue_final_message: the reply follows the generation prompt
        and the prefill, whether the model is local or an upstream's)."""
        if self.prefill is None:
            return {"messages": self.messages}
        return {"messages": [*self.messages, ChatMessage(role="assistant", content=self.prefill)],
                "add_generation_prompt": False, "continue_final_message": True}


def message_request(body: MessageRequest) -> tuple[GenerationRequest, str | None]:
    """The generation and its prefill (see Conversation), which the generation continues: it
    is the final assistant message, with continue_final_message set."""
    _refuse_server_features(body)
    conversation = _conversation(body)
    chosen = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k}
    sampling = SamplingParams().replace(**{k: v for k, v in chosen.items() if v is not None})
    request = GenerationRequest(model=body.model, **conversation.fields(),
                                sampling=sampling, max_tokens=body.max_tokens,
                                stop=list(body.stop_sequences or []),
                                reasoning=thinking(body, body.max_tokens).reasoning,
                                context_overflow=body.context_overflow,
                                priority=body.priority, **tool_fields(body),
                                keep_alive=keep_alive_seconds(body.keep_alive),
                                # thinking absent is off, as in Anthropic's API (its clients
                                # expect no thinking blocks then): a default never turns it on
                                explicit=explicit(body, _NAMES) | {"reasoning"})
    return request, conversation.prefill


def count_request(body: MessagesBase) -> tuple[GenerationRequest, str | None]:
    """The prompt alone, built exactly as message_request builds it."""
    conversation = _conversation(body)
    return GenerationRequest(model=body.model, **conversation.fields(),
                             reasoning=thinking(body, None).reasoning,
                             **tool_fields(body)), conversation.prefill


def _conversation(body: MessagesBase) -> Conversation:
    _refuse_unimplemented(body)
    messages: list[ChatMessage] = []
    system = _system_text(body.system)
    if system is not None:
        messages.append(ChatMessage(role="system", content=system))
    tool_names: dict[str, str] = {}
    turns = list(body.messages)
    prefill = None
    if turns[-1].role == "assistant":
        prefill = _prefill_text(turns.pop(), len(turns))
    for i, turn in enumerate(turns):
        messages.extend(_turn(turn, i, tool_names))
    return Conversation(_merge_adjacent(messages), prefill)


def _refuse_unimplemented(body: MessagesBase) -> None:
    if body.mcp_servers:
        raise unsupported("mcp_servers", "this server connects to no MCP servers")
    if body.context_management is not None:
        raise unsupported("context_management", "this server does not edit context")


def _refuse_server_features(body: MessageRequest) -> None:
    if body.container is not None:
        raise unsupported("container", "this server runs no code-execution containers")
    if body.diagnostics is not None:
        raise unsupported("diagnostics", "cache-miss diagnostics are not reported")


def _system_text(system: str | list[Any] | None) -> str | None:
    if system is None:
        return None
    return system if isinstance(system, str) else "\n".join(block.text for block in system)


def _prefill_text(turn: MessageIn, index: int) -> str:
    if isinstance(turn.content, str):
        return turn.content
    texts = []
    for j, block in enumerate(turn.content):
        if block.type != "text":
            param = f"messages[{index}].content[{j}].type"
            raise invalid(f"{param}: the final assistant message is continued (prefill) and "
                          f"may hold only text blocks, not '{block.type}'", param=param)
        texts.append(_string(block, "text", f"messages[{index}].content[{j}]"))
    return "".join(texts)


def _turn(turn: MessageIn, index: int, tool_names: dict[str, str]) -> list[ChatMessage]:
    if isinstance(turn.content, str):
        return [ChatMessage(role=turn.role, content=turn.content)]
    builder = _TurnBuilder(turn.role, tool_names)
    for j, block in enumerate(turn.content):
        builder.add(block, f"messages[{index}].content[{j}]")
    return builder.messages()


class _TurnBuilder:
    """Collects one turn's blocks into template messages (tool results become `tool` turns)."""

    def __init__(self, role: str, tool_names: dict[str, str]) -> None:
        self.role = role
        self.tool_names = tool_names
        self.texts: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.tool_messages: list[ChatMessage] = []
        self.images: list[ImageInput] = []

    def add(self, block: ContentBlock, param: str) -> None:
        kind = block.type
        if kind == "text":
            self.texts.append(_string(block, "text", param))
        elif kind == "image" and self.role == "user":
            image = _image_source(getattr(block, "source", None), f"{param}.source")
            self.images.append(image.at(joined_offset(self.texts)))
        elif kind == "tool_use" and self.role == "assistant":
            self._tool_use(block, param)
        elif kind == "tool_result" and self.role == "user":
            self._tool_result(block, param)
        elif kind == "thinking" and self.role == "assistant":
            self.reasoning.append(_string(block, "thinking", param))
        elif kind == "redacted_thinking" and self.role == "assistant":
            pass  # encrypted by another provider: nothing a local model can read
        else:
            raise invalid(f"{param}.type: '{kind}' blocks are not supported in a {self.role} "
                          "message", param=f"{param}.type", code="unsupported_content")

    def _tool_use(self, block: ContentBlock, param: str) -> None:
        call_id, name = _string(block, "id", param), _string(block, "name", param)
        arguments = _field(block, "input", dict, param)
        self.tool_names[call_id] = name
        self.tool_calls.append({"id": call_id, "type": "function",
                                "function": {"name": name, "arguments": arguments}})

    def _tool_result(self, block: ContentBlock, param: str) -> None:
        call_id = _string(block, "tool_use_id", param)
        text, images = _tool_result(getattr(block, "content", None), f"{param}.content")
        if getattr(block, "is_error", False):
            text = f"Error: {text}"
            images = tuple(image.at(image.offset + len("Error: ")) for image in images)
        name = self.tool_names.get(call_id)
        self.tool_messages.append(ChatMessage(role="tool", content=text, name=name,
                                              extra={"tool_call_id": call_id}, images=images))

    def messages(self) -> list[ChatMessage]:
        extra: dict[str, Any] = {}
        if self.tool_calls:
            extra["tool_calls"] = self.tool_calls
        if self.reasoning:
            extra["reasoning_content"] = "\n".join(self.reasoning)
        out = list(self.tool_messages)
        if self.texts or extra or self.images or not out:
            out.append(ChatMessage(role=self.role, content="\n".join(self.texts), extra=extra,
                                   images=tuple(self.images)))
        return out


def _tool_result(content: Any, param: str) -> tuple[str, tuple[ImageInput, ...]]:
    """A tool_result's text blocks joined, and the images between them."""
    if content is None or isinstance(content, str):
        return content or "", ()
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of content blocks", param=param)
    texts: list[str] = []
    images: list[ImageInput] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            image = _image_source(part.get("source"), f"{param}[{k}].source")
            images.append(image.at(joined_offset(texts)))
        elif kind != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{param}[{k}] must be a text or image block", param=f"{param}[{k}]")
        else:
            texts.append(part["text"])
    return "\n".join(texts), tuple(images)


def _image_source(source: Any, param: str) -> ImageInput:
    """An image block's source: {"type": "base64", "media_type", "data"} or {"type": "url",
    "url"}; `param` names the source."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type = source.get("media_type")
        if not isinstance(media_type, str):
            raise invalid(f"{param}.media_type is required", param=f"{param}.media_type")
        return image_from_base64(source.get("data"), param, media_type)
    if kind == "url":
        return image_from_url(source.get("url"), param)
    if kind == "file":
        raise unsupported(f"{param}.file_id", "this server keeps no uploaded files; send the "
                          "image as base64 or a URL")
    raise invalid(f"{param}.type must be 'base64' or 'url'", param=f"{param}.type")


def _merge_adjacent(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Anthropic combines consecutive turns of one role; many templates require alternation."""
    merged: list[ChatMessage] = []
    for message in messages:
        last = merged[-1] if merged else None
        if last is not None and last.role == message.role and message.role in ("user",
                                                                                  "assistant") \
                and not last.extra and not message.extra:
            content = f"{last.content}\n\n{message.content}"
            shift = len(content) - len(message.content or "")
            images = (*last.images, *(image.at(image.offset + shift) for image in message.images))
            merged[-1] = ChatMessage(role=last.role, content=content, images=images)
        else:
            merged.append(message)
    return merged


def _field(block: ContentBlock, name: str, kind: type, param: str) -> Any:
    value = getattr(block, name, None)
    if not isinstance(value, kind):
        expected = "a string" if kind is str else "an object"
        raise invalid(f"{param}.{name} is required and must be {expected}",
                      param=f"{param}.{name}")
    return value


def _string(block: ContentBlock, name: str, param: str) -> str:
    return str(_field(block, name, str, param))

