"""Which tool-call format a model writes, read from its chat template."""

from __future__ import annotations

from collections.abc import Mapping

from lmserve.chat.toolparsers import canonical_tool_format

# Checked in order: the first format whose sign appears in the template wins.
_TEMPLATE_SIGNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("harmony", ("<|channel|>",)),
    ("gemma", ("<start_function_call>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", ("<|python_tag|>", '"parameters": dictionary of argument name')),
    ("pythonic", ("<|python_start|>", "[func_name1(")),
    ("tool_code", ("```tool_code",)),
)
# Formats lmserve cannot parse; such a template gets no parser rather than a wrong one.
_UNSUPPORTED_SIGNS = ("<function=",)  # Qwen3-Coder's XML calls
_TOOL_TEMPLATE_KEY = "tokenizer.chat_template.tool_use"
_ARCHITECTURE_FORMATS = {"gpt-oss": "harmony"}


def detect_tool_format(chat_template_source: str | None,
                       model_metadata: Mapping[str, str] | None = None,
                       override: str | None = None) -> str | None:
    """The tool-call format to parse, or None when the model has no known one.

    `override` (configuration) wins: a format name or alias, or "none"/"off" for no parsing.
    Otherwise the template is searched (a GGUF's separate tool-use template first), then the
    architecture is consulted."""
    if override is not None:
        if override.strip().lower() in ("none", "off", ""):
            return None
        return canonical_tool_format(override)
    metadata = model_metadata or {}
    for template in (metadata.get(_TOOL_TEMPLATE_KEY), chat_template_source):
        found = _from_template(template or "")
        if found:
            return found
    return _ARCHITECTURE_FORMATS.get(metadata.get("general.architecture", ""))


def _from_template(template: str) -> str | None:
    if not template or any(sign in template for sign in _UNSUPPORTED_SIGNS):
        return None
    for name, signs in _TEMPLATE_SIGNS:
        if any(sign in template for sign in signs):
            return name
    return None
