"""Render Hugging Face style Jinja2 chat templates (as embedded in GGUF files) in a sandbox."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "CHATML_TEMPLATE", "ChatTemplate", "TemplateError", "flatten_text_content", "load_template_file"
]

CHATML_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_SYSTEM_PROBE = "lmserve-system-probe-7f3a"


class TemplateError(ValueError):
    """A chat template could not be compiled, loaded or rendered."""


class _Undefined(Undefined):
    """Normal jinja undefined, but the sandbox's unsafe-attribute marker fails loudly, not as ''."""

    __slots__ = ()

    def _check_security(self) -> None:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()

    def __str__(self) -> str:
        self._check_security()
        return super().__str__()

    def __bool__(self) -> bool:
        self._check_security()
        return super().__bool__()

    def __iter__(self) -> Iterator[Any]:
        self._check_security()
        return super().__iter__()


class _GenerationExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-span marker): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same semantics as transformers' filter; jinja's builtin one HTML-escapes and sorts keys.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
        undefined=_Undefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def flatten_text_content(content: Any) -> str:
    """Join OpenAI-style text parts with newlines; strings pass through, None becomes ''."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES:
                texts.append(str(part.get("text") or ""))
        return "\n".join(texts)
    return str(content)


def _is_text_only(content: Any) -> bool:
    return isinstance(content, (list, tuple)) and all(
        isinstance(p, str) or (isinstance(p, dict) and p.get("type") in _TEXT_PART_TYPES)
        for p in content
    )


def _prepare_messages(messages: list[dict[str, Any]], flatten: bool) -> list[dict[str, Any]]:
    prepared: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        if flatten and _is_text_only(message.get("content")):
            message = {**message, "content": flatten_text_content(message["content"])}
        prepared.append(message)
    return prepared


class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with."""

    def __init__(
        self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "default"
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise TemplateError(f"invalid chat template {name!r}: template is empty")
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"invalid chat template {name!r}: {exc.message} (line {exc.lineno})"
            ) from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"invalid chat template {name!r}: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        flatten_content: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render the prompt; extra kwargs (e.g. enable_thinking) become template variables."""
        # Like transformers: special tokens first, so explicit kwargs may override them.
        context: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context.update(kwargs)
        context.update(
            messages=_prepare_messages(messages, flatten_content),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
        )
        try:
            return self._template.render(**context)
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateError(f"chat template {self.name!r} blocked by sandbox: {exc}") from exc
        except Exception as exc:  # template code can raise anything (TypeError on None + str, ...)
            raise TemplateError(
                f"chat template {self.name!r} failed to render: {type(exc).__name__}: {exc}"
            ) from exc

    @functools.cached_property
    def supports_tools(self) -> bool:
        """True when the template reads the `tools` variable."""
        try:
            ast = _environment().parse(self.source)
        except jinja2.TemplateError:
            return False
        return "tools" in jinja2.meta.find_undeclared_variables(ast)

    @functools.cached_property
    def supports_system_role(self) -> bool:
        """True when a system message renders without error and its text reaches the prompt."""
        probe = [
            {"role": "system", "content": _SYSTEM_PROBE},
            {"role": "user", "content": "hello"},
        ]
        try:
            return _SYSTEM_PROBE in self.render(probe, add_generation_prompt=True)
        except TemplateError:
            return False


def load_template_file(path: str) -> str:
    """Read an override template: raw Jinja text, or JSON with a `chat_template` key (HF style)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read chat template file {path!r}: {exc}") from exc
    if file.suffix.lower() != ".json":
        if not text.strip():
            raise TemplateError(f"chat template file {path!r} is empty")
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"chat template file {path!r} is not valid JSON: {exc}") from exc
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        named = {
            t.get("name"): t.get("template")
            for t in template
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            template = named["default"]
        elif len(named) == 1:
            template = next(iter(named.values()))
        else:
            raise TemplateError(
                f"chat template file {path!r} has no template named 'default' "
                f"(found: {sorted(str(n) for n in named)})"
            )
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"chat template file {path!r} has no usable 'chat_template' string")
    return template
