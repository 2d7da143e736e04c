"""Streaming reasoning split: think tags, template-opened blocks, chunks split anywhere."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.chat.reasoning import (
    ReasoningParser, detect_reasoning_tags, generation_opens_reasoning,
)
from lmserve.core.events import CHANNEL_OUTPUT, CHANNEL_REASONING, ChatEvent, TextDelta


def run(chunks: list[str], **options: object) -> list[ChatEvent]:
    parser = ReasoningParser(**options)  # type: ignore[arg-type]
    events: list[ChatEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def merged(events: list[ChatEvent]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for event in events:
        assert isinstance(event, TextDelta) and event.text
        if out and out[-1][0] == event.channel:
            out[-1] = (event.channel, out[-1][1] + event.text)
        else:
            out.append((event.channel, event.text))
    return out


R, O = CHANNEL_REASONING, CHANNEL_OUTPUT

CASES: list[tuple[str, dict, list[tuple[str, str]]]] = [
    ("<think>Plan.</think>Answer.", {}, [(R, "Plan."), (O, "Answer.")]),
    ("<think>\nStep 1.\nStep 2.\n</think>\n\nThe answer is 4.", {},
     [(R, "Step 1.\nStep 2."), (O, "The answer is 4.")]),
    ("\n<think>x</think>y", {}, [(R, "x"), (O, "y")]),
    ("Let me think.\n</think>\n\nDone.", {"starts_in_reasoning": True},
     [(R, "Let me think."), (O, "Done.")]),
    ("<think>\nrepeated open tag</think>ok", {"starts_in_reasoning": True},
     [(R, "repeated open tag"), (O, "ok")]),
    ("<think>never closed, cut by max_tokens ", {}, [(R, "never closed, cut by max_tokens")]),
    ("  plain answer, no tags <b>bold</b> 1 < 2", {},
     [(O, "  plain answer, no tags <b>bold</b> 1 < 2")]),
    ("<think>a</think>b<think>c</think>d", {}, [(R, "a"), (O, "b"), (R, "c"), (O, "d")]),
    ("[THINK]hmm[/THINK]yes", {"start": "[THINK]", "end": "[/THINK]"},
     [(R, "hmm"), (O, "yes")]),
    ("<think>x</think>y", {"enabled": False}, [(O, "<think>x</think>y")]),
    ("<think>reasoning mentions </thin and <think> inside</think>out", {},
     [(R, "reasoning mentions </thin and <think> inside"), (O, "out")]),
    ("<think></think>\n\nEmpty thoughts.", {}, [(O, "Empty thoughts.")]),
]


@pytest.mark.parametrize("text,options,expected", CASES)
def test_whole_text(text: str, options: dict, expected: list) -> None:
    assert merged(run([text], **options)) == expected


@pytest.mark.parametrize("text,options,expected", CASES)
def test_every_split_point(text: str, options: dict, expected: list) -> None:
    for cut in range(1, len(text)):
        assert merged(run([text[:cut], text[cut:]], **options)) == expected, cut
    assert merged(run(list(text), **options)) == expected


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_chunking(data: st.DataObject) -> None:
    text, options, expected = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=10)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert merged(run(chunks, **options)) == expected


_BLOCK = st.text(alphabet="ab <>/\n.", max_size=6)  # can never spell a tag


@settings(max_examples=150, deadline=None)
@given(blocks=st.lists(st.tuples(_BLOCK, _BLOCK), min_size=1, max_size=4), data=st.data())
def test_tags_never_leak_and_text_is_kept(blocks: list[tuple[str, str]],
                                          data: st.DataObject) -> None:
    text = "".join(f"<think>{thought}</think>{answer}" for thought, answer in blocks)
    expected: list[tuple[str, str]] = []
    for thought, answer in blocks:
        for channel, piece in ((R, thought.strip()), (O, answer.lstrip())):
            if piece and expected and expected[-1][0] == channel:
                expected[-1] = (channel, expected[-1][1] + piece)
            elif piece:
                expected.append((channel, piece))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert merged(run(chunks)) == expected


def test_holds_back_only_a_possible_tag() -> None:
    parser = ReasoningParser()
    assert parser.feed("Hello <th") == [TextDelta(O, "Hello ")]
    assert parser.feed("ere") == [TextDelta(O, "<there")]
    assert parser.feed("<think>deep") == [TextDelta(R, "deep")]
    assert parser.feed(" thought </") == [TextDelta(R, " thought")]
    assert parser.feed("think>Out") == [TextDelta(O, "Out")]
    assert parser.finish() == []


def test_tag_inside_output_after_reasoning_does_not_leak() -> None:
    events = run(["<think>a</think>b</think>c"])
    assert merged(events) == [(R, "a"), (O, "b</think>c")]


def test_detect_tags_and_template_opened_blocks() -> None:
    qwen3 = "{%- if enable_thinking is defined and enable_thinking is false %}" \
            "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    assert detect_reasoning_tags(qwen3) == ("<think>", "</think>")
    assert detect_reasoning_tags("[THINK]{{ m }}[/THINK]") == ("[THINK]", "[/THINK]")
    assert detect_reasoning_tags("<|im_start|>{{ m }}") is None
    assert detect_reasoning_tags(None) is None
    tags = ("<think>", "</think>")
    assert generation_opens_reasoning("<|im_start|>assistant\n<think>\n", tags)
    assert not generation_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n", tags)
    assert not generation_opens_reasoning("<|im_start|>assistant\n", tags)


def test_rejects_empty_tags() -> None:
    with pytest.raises(ValueError):
        ReasoningParser(start="", end="</x>")
