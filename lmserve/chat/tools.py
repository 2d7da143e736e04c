"""Tool calling, model side: streaming call parsers, format detection, the fallback prompt.

The parsers live in lmserve.chat.toolparsers (one module per family), the prompt format for
templates without tool support in lmserve.chat.tool_prompt, and the grammars that force a
call in lmserve.chat.grammar. This module is the one place the rest of lmserve imports from.
"""

from __future__ import annotations

from lmserve.chat.tool_prompt import (
    FALLBACK_TOOL_FORMAT,
    apply_fallback_tool_prompt,
    render_tool_instructions,
)
from lmserve.chat.toolparsers import (
    TOOL_FORMATS,
    StreamParser,
    canonical_tool_format,
    make_tool_parser,
)
from lmserve.chat.toolparsers.base import new_call_id
from lmserve.chat.toolparsers.detect import detect_tool_format

__all__ = [
    "FALLBACK_TOOL_FORMAT", "TOOL_FORMATS", "StreamParser", "apply_fallback_tool_prompt",
    "canonical_tool_format", "detect_tool_format", "make_tool_parser", "new_call_id",
    "render_tool_instructions",
]
