"""Control tokens that a chat parser reads as markers are rendered into the text; others not."""

from __future__ import annotations

from lmserve.chat.toolparsers import marker_texts
from lmserve.core.request import SamplingParams
from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import FakeRunner, reference_output

PROMPT = [3, 9, 4, 11, 5]
OUTPUT = reference_output(PROMPT, 12)
CONTROL = OUTPUT[4]  # a token the fake model will generate, made a control token below


class ControlRunner(FakeRunner):
    def piece(self, token: int) -> bytes:
        return b"" if token == CONTROL else super().piece(token)

    def token_bytes(self, token: int) -> bytes:
        return b"<|marker|>" if token == CONTROL else super().token_bytes(token)


def generate(render_special: frozenset[int]) -> str:
    texts: list[str] = []

    def sink(step: StepOutputs) -> None:
        texts.extend(o.text for _, items in step for o in items)

    core = EngineCore(ControlRunner(), n_slots=2, max_running=1, step_tokens=32, sink=sink)
    core.add(EngineRequest(prompt_tokens=PROMPT, sampling=SamplingParams(temperature=0),
                           max_tokens=12, render_special=render_special))
    while core.has_work:
        core.step()
    return "".join(texts)


def test_control_tokens_render_only_when_asked():
    assert "<|marker|>" not in generate(frozenset())
    shown = generate(frozenset({CONTROL}))
    assert shown.count("<|marker|>") == OUTPUT.count(CONTROL)
    assert shown.replace("<|marker|>", "") == generate(frozenset())


def test_marker_texts_per_format():
    assert "<|python_tag|>" in marker_texts("llama3_json", None)
    assert {"<|channel|>", "<|message|>", "<|call|>"} <= marker_texts("gpt-oss", None)
    assert "[TOOL_CALLS]" in marker_texts("mistral", ("<think>", "</think>"))
    assert marker_texts(None, ("<think>", "</think>")) == {"<think>", "</think>"}
    assert marker_texts(None, None) == set()
