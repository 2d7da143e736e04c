"""Forced tool calls in the model's own format, against the real SmolLM2 served under chat
templates of other families (per-model `chat_template` in a config file): Mistral (the v0.3
`[TOOL_CALLS][...]` list and the v11 `[TOOL_CALLS]name[ARGS]{...}` form), pythonic (Llama
3.2), Gemma (FunctionGemma) and harmony (gpt-oss). The template renders the tools itself, the
grammar makes the model write the call in that family's syntax after the generation prompt,
and the family's parser reads it back: a proper call (name, arguments valid against the
schema), a tool-call finish, and no marker text in the content, in the OpenAI chat API
(streamed and not, tool_choice required, one call), the Anthropic Messages API (a named tool)
and the Responses API (streamed, parallel calls allowed).

With parallel calls allowed the grammar may end after every call, but whether the model ends
there is its own choice: SmolLM2 under the Gemma template goes on writing new calls (with
nonsense arguments, valid against the schema) until max_tokens, so the parallel case is
tested where it stops by itself; a repeated call ending the turn is tested per family in
tests/unit/chat/test_native_forced_calls.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import openai
import pytest

from tests.model.conftest import Server, start_server, stop_server
from tests.model.test_tools_openai import SCHEMAS, TOOLS

LIMIT = 200
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

_TURNS = ("{% for m in messages %}{% if m.role == 'user' %}{USER}"
          "{% elif m.role == 'assistant' and m.tool_calls %}{CALLS}"
          "{% elif m.role == 'assistant' %}{ASSISTANT}{% else %}{TOOL}{% endif %}{% endfor %}")


def _turns(user: str, calls: str, assistant: str, tool: str) -> str:
    return (_TURNS.replace("{USER}", user).replace("{CALLS}", calls)
            .replace("{ASSISTANT}", assistant).replace("{TOOL}", tool))


# Each family's shape: where the tools go, how the assistant's calls are written back, and the
# generation prompt (the grammar applies after it).
TEMPLATES = {
    "mistral": (
        "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
        + _turns("[INST]{{ m.content }}[/INST]",
                 "[TOOL_CALLS][{% for c in m.tool_calls %}{{ {'name': c.function.name, "
                 "'arguments': c.function.arguments} | tojson }}{% if not loop.last %}, "
                 "{% endif %}{% endfor %}]</s>",
                 "{{ m.content }}</s>", "[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]")),
    "mistral_args": (
        "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
        + _turns("[INST]{{ m.content }}[/INST]",
                 "{% for c in m.tool_calls %}[TOOL_CALLS]{{ c.function.name }}[ARGS]"
                 "{{ c.function.arguments | tojson }}{% endfor %}</s>",
                 "{{ m.content }}</s>", "[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]")),
    "pythonic": (
        "<|start_header_id|>system<|end_header_id|>\n\n{% if tools %}You may call functions. "
        "Answer with [func_name1(params_name1=params_value1, params_name2=params_value2...), "
        "func_name2(params)] and nothing else.\n{% for t in tools %}{{ t | tojson }}\n"
        "{% endfor %}{% endif %}<|eot_id|>"
        + _turns("<|start_header_id|>user<|end_header_id|>\n\n{{ m.content }}<|eot_id|>",
                 "<|start_header_id|>assistant<|end_header_id|>\n\n[{% for c in m.tool_calls %}"
                 "{{ c.function.name }}(){% endfor %}]<|eot_id|>",
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{{ m.content }}<|eot_id|>",
                 "<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>")
        + "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}"),
    "gemma": (
        "{% if tools %}<start_of_turn>developer\n{% for t in tools %}"
        "<start_function_declaration>{{ t | tojson }}<end_function_declaration>{% endfor %}"
        "<end_of_turn>\n{% endif %}"
        + _turns("<start_of_turn>user\n{{ m.content }}<end_of_turn>\n",
                 "<start_of_turn>model\n{% for c in m.tool_calls %}<start_function_call>call:"
                 "{{ c.function.name }}{}<end_function_call>{% endfor %}",
                 "<start_of_turn>model\n{{ m.content }}<end_of_turn>\n",
                 "<start_function_response>{{ m.content }}<end_function_response>")
        + "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "harmony": (
        "<|start|>system<|message|>Reasoning: low\n# Valid channels: analysis, commentary, "
        "final.<|end|>{% if tools %}<|start|>developer<|message|># Tools\n\nnamespace "
        "functions {\n{% for t in tools %}// {{ t.function.description }}\ntype "
        "{{ t.function.name }} = (_: {{ t.function.parameters | tojson }}) => any;\n"
        "{% endfor %}} // namespace functions<|end|>{% endif %}"
        + _turns("<|start|>user<|message|>{{ m.content }}<|end|>",
                 "{% for c in m.tool_calls %}<|start|>assistant<|channel|>commentary "
                 "to=functions.{{ c.function.name }} <|constrain|>json<|message|>"
                 "{{ c.function.arguments | tojson }}<|call|>{% endfor %}",
                 "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>",
                 "<|start|>functions.x to=assistant<|channel|>commentary<|message|>"
                 "{{ m.content }}<|end|>")
        + "{% if add_generation_prompt %}<|start|>assistant{% endif %}"),
}
MARKERS = ("[TOOL", "[ARGS", "<start_function", "<escape", "<|", "call:", "to=functions",
           "get_weather", "get_time", "<tool")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("families")
    for name in TEMPLATES:  # a file each: sections of one file share its first template
        os.link(model_path, tmp / f"{name}.gguf")
    sections = "".join(
        f"[models.{name}]\nmodel = {json.dumps(str(tmp / f'{name}.gguf'))}\n"
        f"load = \"start\"\n"
        f"keep_alive = -1\nchat_template = {json.dumps(template)}\n\n"
        for name, template in TEMPLATES.items())
    settings = tmp / "families.toml"
    settings.write_text(f"[server]\nmax_loaded = {len(TEMPLATES)}\n\n{sections}")
    srv = start_server(str(tmp), "--config", str(settings), "--ctx", "2048", "--parallel", "1",
                       "--threads", "2", "--data-dir", str(tmp), "--store", "memory")
    yield srv
    stop_server(srv)


@pytest.fixture()
def oai(families: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=families.base_url, api_key="unused", max_retries=0,
                       timeout=300) as c:
        yield c


def no_marker(text: str | None) -> None:
    assert not text or not any(m in text for m in MARKERS), text


def check(calls: list[tuple[str, Any]], names: set[str], one: bool = False) -> None:
    assert calls, "no call was made"
    assert not one or len(calls) == 1, calls
    assert len({json.dumps(c, sort_keys=True) for c in calls}) == len(calls), calls  # no repeat
    for name, arguments in calls:
        assert name in names, calls
        jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("family", TEMPLATES)
def test_openai_chat(oai: openai.OpenAI, family: str) -> None:
    kw: dict[str, Any] = dict(model=family, messages=ASK, tools=TOOLS, tool_choice="required",
                              parallel_tool_calls=False, max_tokens=LIMIT, temperature=0)
    r = oai.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    check([(c.function.name, json.loads(c.function.arguments))
           for c in choice.message.tool_calls or []], {"get_weather", "get_time"}, one=True)
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in oai.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, ["", ""])
            if call.function:
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and not content, content
    check([(name, json.loads(arguments)) for name, arguments in calls.values()],
          {"get_weather", "get_time"}, one=True)


@pytest.mark.parametrize("family", ["mistral", "pythonic", "harmony"])
def test_responses_streamed(oai: openai.OpenAI, family: str) -> None:
    events = list(oai.responses.create(
        model=family, input=ASK[0]["content"], tool_choice="required", stream=True,
        max_output_tokens=LIMIT, temperature=0,
        tools=[{"type": "function", **t["function"]} for t in TOOLS]))  # type: ignore[misc]
    assert events[-1].type == "response.completed", events[-1]
    final = events[-1].response
    no_marker("".join(getattr(e, "delta", "") for e in events
                      if e.type == "response.output_text.delta"))
    assert not final.output_text
    check([(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"],
          {"get_weather", "get_time"})


@pytest.mark.parametrize("family", TEMPLATES)
def test_anthropic_named_tool(families: Server, family: str) -> None:
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    with anthropic.Anthropic(base_url=families.url, api_key="unused", max_retries=0,
                             timeout=300) as claude:
        r = claude.messages.create(
            model=family, max_tokens=LIMIT, messages=ASK, tools=tools,  # type: ignore[arg-type]
            tool_choice={"type": "tool", "name": "get_time"}, extra_body={"temperature": 0})
    assert r.stop_reason == "tool_use", r
    for block in r.content:
        no_marker(getattr(block, "text", None))
    check([(b.name, b.input) for b in r.content if b.type == "tool_use"], {"get_time"},
          one=True)
