"""Streaming tool-call parsers, one per model family's call format.

Every parser has feed(text) -> list[ChatEvent] and finish() -> list[ChatEvent]. Text that is
not a call comes out as output TextDeltas; a call comes out as ToolCallStart (index, id, name),
ToolCallDelta fragments of its arguments JSON and ToolCallEnd with the whole arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lmserve.chat.toolparsers.gemma import FunctionGemmaParser
from lmserve.chat.toolparsers.harmony import HarmonyParser
from lmserve.chat.toolparsers.jsonformats import HermesParser, Llama3JsonParser, MistralParser
from lmserve.chat.toolparsers.pythonic import PythonicParser, ToolCodeParser
from lmserve.core.events import ChatEvent

__all__ = ["TOOL_FORMATS", "StreamParser", "canonical_tool_format", "make_tool_parser",
           "marker_texts"]


class StreamParser(Protocol):
    def feed(self, text: str) -> list[ChatEvent]: ...

    def finish(self) -> list[ChatEvent]: ...


TOOL_FORMATS: dict[str, Callable[[], StreamParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "gemma": FunctionGemmaParser,
    "tool_code": ToolCodeParser,
    "harmony": HarmonyParser,
}
# The markers each format's parser reads. Many vocabularies make them control tokens, which
# llama.cpp leaves out of the text unless asked, so the engine renders exactly these.
FORMAT_MARKERS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "pythonic": ("<|python_start|>", "<|python_end|>"),
    "gemma": ("<start_function_call>", "<end_function_call>", "<escape>"),
    "tool_code": (),
    "harmony": ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>",
                "<|call|>", "<|return|>"),
}
_ALIASES = {
    "qwen": "hermes", "qwen2": "hermes", "qwen2.5": "hermes", "qwen3": "hermes",
    "llama3": "llama3_json", "llama": "llama3_json", "llama4_pythonic": "pythonic",
    "functiongemma": "gemma", "function_gemma": "gemma", "gpt-oss": "harmony",
}


def canonical_tool_format(name: str) -> str:
    """The registered name for a format or one of its aliases; ValueError if unknown."""
    key = name.strip().lower().replace("-", "_") if name.strip().lower() != "gpt-oss" else "gpt-oss"
    key = _ALIASES.get(key, key)
    if key not in TOOL_FORMATS:
        known = ", ".join(sorted(TOOL_FORMATS))
        raise ValueError(f"unknown tool-call format {name!r}; known formats: {known}")
    return key


def marker_texts(tool_format: str | None, reasoning_tags: tuple[str, str] | None) -> set[str]:
    """The marker strings a chat parser for this format and these think tags must see."""
    texts = set(FORMAT_MARKERS[canonical_tool_format(tool_format)]) if tool_format else set()
    texts.update(reasoning_tags or ())
    return texts


def make_tool_parser(name: str) -> StreamParser:
    return TOOL_FORMATS[canonical_tool_format(name)]()
