"""Context overflow policy (lmserve.chat.overflow): which turns truncation drops, the binary
search over them, the impossible case, and the policy inside ModelService.prepare/start."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.chat.overflow import (Budget, fit_chat, fit_turns, output_reserve, reply_room,
                                   turn_cuts)
from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.service import EngineSettings
from tests.unit.chat_service import ScriptedService, script


@dataclass
class Rendered:
    messages: list[ChatMessage]
    tokens: list[int]


class WordRender:
    """One token per word of each message, plus two per message for its framing."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages: list[ChatMessage]) -> Rendered:
        self.calls += 1
        n = sum(2 + len((m.content or "").split()) for m in messages)
        return Rendered(messages, list(range(n)))


def msg(role: str, words: int = 1, **extra: object) -> ChatMessage:
    return ChatMessage(role, " ".join(["w"] * words), extra=dict(extra))


def fit(messages: list[ChatMessage], window: int, room: int) -> tuple[Rendered, int, int]:
    render = WordRender()
    rendered, dropped = fit_turns(messages, render, Budget(window, room))
    return rendered, dropped, render.calls


CALL = {"tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}
TOOL_TURN = [msg("user", 10), msg("assistant", 0, **CALL),
             msg("tool", 50, tool_call_id="c1"), msg("assistant", 10)]


def test_a_prompt_that_fits_is_rendered_once_and_kept_whole() -> None:
    messages = [msg("system", 5), msg("user", 5), msg("assistant", 5), msg("user", 5)]
    rendered, dropped, calls = fit(messages, window=100, room=10)
    assert rendered.messages == messages and dropped == 0 and calls == 1


def test_the_oldest_turns_go_first_and_the_system_prompt_stays() -> None:
    messages = [msg("system", 5), msg("developer", 5), msg("user", 40), msg("assistant", 40),
                msg("user", 10), msg("assistant", 10), msg("user", 10)]
    rendered, dropped, _ = fit(messages, window=100, room=20)
    assert dropped == 2 and rendered.messages == messages[:2] + messages[4:]
    assert len(rendered.tokens) + 20 <= 100


def test_a_tool_call_leaves_with_its_results() -> None:
    messages = [msg("system"), *TOOL_TURN, msg("user", 5)]
    rendered, dropped, _ = fit(messages, window=40, room=10)
    assert dropped == 4 and [m.role for m in rendered.messages] == ["system", "user"]


def test_the_last_user_turn_stays_whole_with_its_tool_calls() -> None:
    messages = [msg("user", 30), msg("assistant", 30), *TOOL_TURN]
    rendered, dropped, _ = fit(messages, window=200, room=80)
    assert dropped == 2 and rendered.messages == TOOL_TURN


def test_impossible_when_the_last_turn_alone_does_not_fit() -> None:
    messages = [msg("system", 5), msg("user", 5), msg("assistant", 5), msg("user", 200)]
    with pytest.raises(LmserveError) as caught:
        fit(messages, window=100, room=10)
    error = caught.value
    assert error.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED and error.code == "context_length_exceeded"
    assert "truncation could not make the prompt fit" in error.message
    assert "after dropping the 2 oldest messages" in error.message


def test_nothing_to_drop_is_impossible_too() -> None:
    with pytest.raises(LmserveError, match="with no earlier turn to drop"):
        fit([msg("system", 50), msg("user", 60)], window=100, room=10)


def test_short_of_the_room_the_shortest_prompt_still_goes_if_it_fits() -> None:
    messages = [msg("user", 10), msg("assistant", 10), msg("user", 80)]
    rendered, dropped, _ = fit(messages, window=100, room=30)
    assert dropped == 2 and len(rendered.tokens) == 82  # 18 tokens of room, not 30
    whole, none, _ = fit([msg("user", 80)], window=100, room=30)
    assert none == 0 and len(whole.tokens) == 82


def test_turn_cuts() -> None:
    assert turn_cuts([msg("system"), msg("user"), msg("assistant"), msg("user")]) == (1, [1, 3])
    assert turn_cuts([msg("assistant"), msg("user"), msg("user")]) == (0, [0, 1, 2])
    assert turn_cuts([msg("system"), msg("assistant")]) == (1, [1])
    assert turn_cuts([]) == (0, [0])


@settings(max_examples=150, deadline=None)
@given(turns=st.lists(st.integers(0, 60), min_size=1, max_size=40),
       system=st.integers(0, 20), room=st.integers(1, 200))
def test_binary_search_finds_the_fewest_dropped_turns(turns: list[int], system: int,
                                                      room: int) -> None:
    messages = [msg("system", system)]
    for words in turns:
        messages += [msg("user", words), msg("assistant", words // 2)]
    messages.append(msg("user", 3))
    window = 400
    sizes = [len(WordRender()(messages[:1] + messages[1 + 2 * k:]).tokens)
             for k in range(len(turns) + 1)]
    fitting = [k for k, n in enumerate(sizes) if n + room <= window]
    try:
        rendered, dropped, calls = fit(messages, window, room)
    except LmserveError:
        assert not fitting and sizes[-1] >= window
        return
    expected = fitting[0] if fitting else len(turns)
    assert dropped == 2 * expected and len(rendered.tokens) == sizes[expected]
    assert calls <= 3 + len(turns).bit_length()


def test_reply_room() -> None:
    assert output_reserve(4096) == 1024 and output_reserve(100_000) == 1024
    assert output_reserve(8) == 2 and output_reserve(2) == 1
    assert reply_room(4096, None) == 1024 and reply_room(4096, 3000) == 3000
    assert reply_room(4096, 3000, capped=True) == 1024
    assert reply_room(4096, 100, capped=True) == 100


def test_fit_chat_aims_at_max_tokens_or_the_reserve() -> None:
    request = GenerationRequest(messages=[msg("user", 50), msg("assistant", 50), msg("user", 5)])
    seen: list[GenerationRequest] = []

    def render(gen: GenerationRequest) -> Rendered:
        seen.append(gen)
        return WordRender()(gen.messages or [])

    assert fit_chat(request, render, 150)[1] == 0  # 111 tokens + a reserve of 37
    assert fit_chat(request, render, 140)[1] == 2  # 111 + 35 do not fit
    assert fit_chat(dataclasses.replace(request, max_tokens=80), render, 200)[1] == 0
    assert fit_chat(dataclasses.replace(request, max_tokens=100), render, 200)[1] == 2
    assert fit_chat(dataclasses.replace(request, max_tokens=10), render, 140)[1] == 0
    assert all(gen.max_tokens in (None, 80, 100, 10) for gen in seen)


# ---- the policy in the service ---------------------------------------------------------------

LONG = [ChatMessage("system", "Be brief."), ChatMessage("user", "x" * 3000),
        ChatMessage("assistant", "y" * 1000), ChatMessage("user", "Hi?")]


def service(default: str = "error") -> ScriptedService:
    svc = ScriptedService(script(["ok"]), CHATML_TEMPLATE)
    svc.settings = EngineSettings(parallel=4, context_overflow=default)
    svc.n_ctx = 2048  # the stub tokenizer: one token per character
    return svc


def test_error_by_default_and_truncate_on_request() -> None:
    svc = service()
    refused = svc.prepare(GenerationRequest(messages=LONG))
    assert refused.dropped_messages == 0 and not refused.truncating
    with pytest.raises(LmserveError) as caught:
        svc.check_context(len(refused.tokens), None)
    assert caught.value.code == "context_length_exceeded"
    fitted = svc.prepare(GenerationRequest(messages=LONG, context_overflow="truncate"))
    assert fitted.dropped_messages == 2 and fitted.truncating
    assert "Be brief." in (fitted.text or "") and "x" * 10 not in (fitted.text or "")
    assert len(fitted.tokens) + output_reserve(2048) <= 2048


def test_the_server_default_applies_unless_the_request_chooses() -> None:
    svc = service("truncate")
    assert svc.prepare(GenerationRequest(messages=LONG)).dropped_messages == 2
    kept = svc.prepare(GenerationRequest(messages=LONG, context_overflow="error"))
    assert kept.dropped_messages == 0 and len(kept.tokens) > 2048


def test_a_max_tokens_truncation_cannot_meet_is_refused_saying_so() -> None:
    svc = service("truncate")
    request = GenerationRequest(messages=LONG, max_tokens=2000)
    prepared = svc.prepare(request)
    assert prepared.dropped_messages == 2  # everything droppable went, still short of room
    with pytest.raises(LmserveError) as caught:
        svc.check_context(len(prepared.tokens), 2000, truncating=prepared.truncating)
    assert caught.value.param == "max_tokens"
    assert "truncation already dropped every turn" in caught.value.message
