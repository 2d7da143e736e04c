"""Unit tests for lmserve.chat.templates (pure rendering, no model)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lmserve.chat.templates import (
    CHATML_TEMPLATE,
    ChatTemplate,
    TemplateError,
    flatten_text_content,
    load_template_file,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = """{% set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}
{{ bos_token }}{% for message in messages %}
{% set expect_user = (loop.index0 - offset) % 2 == 0 %}
{% if message['role'] != 'system' and (message['role'] == 'user') != expect_user %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{% endif %}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
{{ message['content'] | trim + '<|eot_id|>' -}}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}"""

SYSTEM_USER = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
]


# --- ChatML / SmolLM2 -------------------------------------------------------------------------


def test_smollm2_system_and_user_with_generation_prompt() -> None:
    out = ChatTemplate(SMOLLM2_TEMPLATE).render(SYSTEM_USER)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_default_system_without_generation_prompt() -> None:
    out = ChatTemplate(SMOLLM2_TEMPLATE).render(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=False
    )
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    )


def test_chatml_fallback_template() -> None:
    tpl = ChatTemplate(CHATML_TEMPLATE)
    messages = [*SYSTEM_USER, {"role": "assistant", "content": "Hello."}]
    assert tpl.render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    expected = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tpl.render(SYSTEM_USER[1:]) == expected


def test_chatml_fallback_tolerates_null_content() -> None:
    out = ChatTemplate(CHATML_TEMPLATE).render(
        [{"role": "assistant", "content": None}], add_generation_prompt=False
    )
    assert out == "<|im_start|>assistant\n<|im_end|>\n"


# --- Llama-3 style: bos_token and raise_exception --------------------------------------------


def test_llama3_style_uses_bos_token() -> None:
    tpl = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    out = tpl.render(
        [
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": " Q1 "},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ]
    )
    assert out == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_raise_exception_surfaces_as_template_error_with_message() -> None:
    tpl = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<s>")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError) as info:
        tpl.render(bad)
    assert str(info.value) == "Conversation roles must alternate user/assistant/user/assistant/..."
    assert isinstance(info.value, ValueError)


def test_special_tokens_can_be_overridden_by_kwargs() -> None:
    tpl = ChatTemplate("{{ bos_token }}|{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert tpl.render([]) == "<s>|</s>"
    assert tpl.render([], bos_token="") == "|</s>"


# --- globals and filters ---------------------------------------------------------------------


def test_tojson_indent_and_non_ascii() -> None:
    tpl = ChatTemplate("{{ data | tojson(indent=2) }}")
    assert tpl.render([], data={"name": "café", "n": [1, 2]}) == (
        '{\n  "name": "café",\n  "n": [\n    1,\n    2\n  ]\n}'
    )


def test_tojson_defaults_and_kwargs() -> None:
    data = {"b": "<é>", "a": 1}
    assert ChatTemplate("{{ data | tojson }}").render([], data=data) == '{"b": "<é>", "a": 1}'
    sorted_compact = ChatTemplate("{{ data | tojson(separators=(',', ':'), sort_keys=true) }}")
    assert sorted_compact.render([], data=data) == '{"a":1,"b":"<é>"}'
    ascii_only = ChatTemplate("{{ data | tojson(ensure_ascii=true) }}")
    assert ascii_only.render([], data=data) == '{"b": "<\\u00e9>", "a": 1}'


def test_strftime_now() -> None:
    tpl = ChatTemplate("{{ strftime_now('%Y') }}|{{ strftime_now('fixed') }}")
    before = datetime.now().year
    year, fixed = tpl.render([]).split("|")
    assert fixed == "fixed"
    assert before <= int(year) <= datetime.now().year


def test_loopcontrols_break_and_continue() -> None:
    tpl = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% if m['content'] == 'stop' %}{% break %}{% endif %}[{{ m['content'] }}]{% endfor %}"
    )
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "stop"},
        {"role": "user", "content": "never"},
    ]
    assert tpl.render(messages) == "[a]"


def test_generation_block_renders_body() -> None:
    tpl = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}<A>{{ m['content'] }}</A>{% endgeneration %}"
        "{% else %}<U>{{ m['content'] }}</U>{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert tpl.render(messages) == "<U>q</U><A>r</A>"


# --- context variables -------------------------------------------------------------------------


def test_tools_passed_through() -> None:
    tpl = ChatTemplate(
        "{% if tools %}{% for tool in tools %}"
        "<tool>{{ tool['function']['name'] }}:"
        "{{ tool['function']['parameters'] | tojson }}</tool>\n"
        "{% endfor %}{% endif %}{{ messages[-1]['content'] }}"
    )
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}},
        },
        {"type": "function", "function": {"name": "noop", "parameters": {}}},
    ]
    out = tpl.render([{"role": "user", "content": "go"}], tools=tools)
    assert out == '<tool>get_weather:{"type": "object"}</tool>\n<tool>noop:{}</tool>\ngo'
    assert tpl.render([{"role": "user", "content": "go"}]) == "go"
    assert tpl.supports_tools is True
    assert ChatTemplate(SMOLLM2_TEMPLATE).supports_tools is False


def test_tool_call_fields_reach_template() -> None:
    tpl = ChatTemplate(
        "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "call {{ c.id }} {{ c.function.name }}({{ c.function.arguments }})\n{% endfor %}"
        "{% elif m.role == 'tool' %}result {{ m.tool_call_id }} {{ m.name }}: {{ m.content }}\n"
        "{% endif %}{% endfor %}"
    )
    messages = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "42"},
    ]
    assert tpl.render(messages) == 'call c1 f({"x":1})\nresult c1 f: 42\n'


def test_documents_and_generation_flag_variables() -> None:
    tpl = ChatTemplate(
        "{% if documents %}{% for d in documents %}<{{ d.title }}>{% endfor %}{% endif %}"
        "{{ add_generation_prompt }}"
    )
    assert tpl.render([], documents=[{"title": "a"}, {"title": "b"}]) == "<a><b>True"
    assert tpl.render([], add_generation_prompt=False) == "False"


def test_extra_kwargs_reach_template() -> None:
    tpl = ChatTemplate(
        "{{ messages[0]['content'] }}"
        "{% if enable_thinking is defined and enable_thinking is false %} /no_think{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}]
    assert tpl.render(messages, enable_thinking=False) == "hi /no_think"
    assert tpl.render(messages, enable_thinking=True) == "hi"
    assert tpl.render(messages) == "hi"


def test_missing_variables_behave_like_normal_jinja() -> None:
    tpl = ChatTemplate("[{{ nothing }}]{% if nothing %}yes{% else %}no{% endif %}[{{ m.x }}]")
    assert tpl.render([], m={}) == "[]no[]"


def test_undefined_attribute_of_undefined_is_template_error() -> None:
    with pytest.raises(TemplateError, match="failed to render.*'nothing' is undefined"):
        ChatTemplate("{{ nothing.deeper }}").render([])


def test_non_jinja_exception_is_wrapped() -> None:
    # SmolLM2 concatenates content, so a None content raises TypeError inside the template.
    with pytest.raises(TemplateError, match="failed to render: TypeError"):
        ChatTemplate(SMOLLM2_TEMPLATE).render([{"role": "assistant", "content": None}])


# --- errors and sandbox ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__subclasses__() }}",
        "{% for c in ''.__class__.__mro__ %}{{ c }}{% endfor %}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_blocks_escape_attempts(source: str) -> None:
    tpl = ChatTemplate(source)
    with pytest.raises(TemplateError, match="unsafe"):
        tpl.render([{"role": "user", "content": "x"}])


def test_syntax_error_at_construction() -> None:
    with pytest.raises(TemplateError, match="invalid chat template") as info:
        ChatTemplate("{% for m in messages %}{{ m }}", name="broken")
    assert "'broken'" in str(info.value)
    with pytest.raises(TemplateError, match="invalid chat template"):
        ChatTemplate("{{ }")


def test_empty_template_rejected() -> None:
    with pytest.raises(TemplateError, match="invalid chat template"):
        ChatTemplate("   ")


def test_compiled_template_is_cached_by_source() -> None:
    a = ChatTemplate(SMOLLM2_TEMPLATE, bos_token="x")
    b = ChatTemplate(SMOLLM2_TEMPLATE, bos_token="y")
    assert a._template is b._template
    assert a.source == SMOLLM2_TEMPLATE
    messages = [{"role": "user", "content": "z"}]
    assert a.render(messages) == b.render(messages)


# --- content flattening ----------------------------------------------------------------------


def test_flatten_text_content_helper() -> None:
    assert flatten_text_content(None) == ""
    assert flatten_text_content("plain") == "plain"
    parts: list[Any] = [
        {"type": "text", "text": "one"},
        {"type": "image_url", "image_url": {"url": "http://x"}},
        {"type": "text", "text": "two"},
    ]
    assert flatten_text_content(parts) == "one\ntwo"
    assert flatten_text_content([]) == ""


def test_render_flattens_text_only_part_lists() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    out = ChatTemplate(SMOLLM2_TEMPLATE).render(messages, add_generation_prompt=False)
    assert out.endswith("<|im_start|>user\na\nb<|im_end|>\n")
    assert isinstance(messages[0]["content"], list)  # caller's messages are not mutated


def test_render_can_pass_part_lists_through() -> None:
    tpl = ChatTemplate(
        "{% for m in messages %}{% if m.content is string %}S:{{ m.content }}"
        "{% else %}{% for p in m.content %}[{{ p.type }}]{% endfor %}{% endif %}{% endfor %}"
    )
    text_only = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    assert tpl.render(text_only) == "S:a"
    assert tpl.render(text_only, flatten_content=False) == "[text]"
    mixed = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}],
        }
    ]
    assert tpl.render(mixed) == "[text][image_url]"


# --- heuristics ------------------------------------------------------------------------------


def test_supports_system_role() -> None:
    assert ChatTemplate(SMOLLM2_TEMPLATE).supports_system_role is True
    rejecting = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    assert rejecting.supports_system_role is False
    dropping = ChatTemplate(
        "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    assert dropping.supports_system_role is False


# --- load_template_file ----------------------------------------------------------------------


def test_load_jinja_file(tmp_path: Path) -> None:
    for name in ("tpl.jinja", "tpl.j2"):
        path = tmp_path / name
        path.write_text(SMOLLM2_TEMPLATE, encoding="utf-8")
        assert load_template_file(str(path)) == SMOLLM2_TEMPLATE


def test_load_json_string_form(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": CHATML_TEMPLATE, "bos_token": "<s>"}))
    source = load_template_file(str(path))
    assert source == CHATML_TEMPLATE
    assert ChatTemplate(source).render([{"role": "user", "content": "q"}]) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_json_list_form_picks_default(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": "DEFAULT"},
                ]
            }
        )
    )
    assert load_template_file(str(path)) == "DEFAULT"


def test_load_json_errors(tmp_path: Path) -> None:
    no_default = tmp_path / "a.json"
    no_default.write_text(
        json.dumps(
            {"chat_template": [{"name": "x", "template": "X"}, {"name": "y", "template": "Y"}]}
        )
    )
    with pytest.raises(TemplateError, match="default"):
        load_template_file(str(no_default))
    missing_key = tmp_path / "b.json"
    missing_key.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(TemplateError, match="chat_template"):
        load_template_file(str(missing_key))
    broken = tmp_path / "c.json"
    broken.write_text("{not json")
    with pytest.raises(TemplateError, match="not valid JSON"):
        load_template_file(str(broken))
    with pytest.raises(TemplateError, match="cannot read"):
        load_template_file(str(tmp_path / "missing.jinja"))
