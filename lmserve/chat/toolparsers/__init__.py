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

__all__ = ["TOOL_FORMATS", "StreamParser", "canonical_tool_format", "make_tool_parser"]


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


def make_tool_parser(name: str) -> StreamParser:
    return TOOL_FORMATS[canonical_tool_format(name)]()
