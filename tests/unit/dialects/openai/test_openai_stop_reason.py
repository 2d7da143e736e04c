"""vLLM's stop_reason beside finish_reason, and continue_final_message on the chat route."""

from __future__ import annotations

import pytest

from lmserve.core.backend import ChoiceStep, Finished, FinishReason
from lmserve.core.errors import LmserveError
from lmserve.core.events import Usage
from lmserve.dialects.openai import adapter, encoder
from lmserve.dialects.openai.schema import ChatCompletionRequest


def ended(match: str | None, reason: FinishReason = FinishReason.STOP) -> ChoiceStep:
    return ChoiceStep(0, "", end=Finished(reason, Usage(3, 2), match))


@pytest.mark.parametrize("match, stop_ids, expected", [
    ("5,", (), "5,"), ("7", (7,), 7), ("7", (), "7"), (None, (), None)])
def test_the_body_and_the_last_chunk_name_the_stop_that_ended_the_choice(match, stop_ids,
                                                                         expected):
    collected = encoder.Collected(stop_ids=frozenset(stop_ids))
    collected.add(ended(match), 0)
    [choice] = encoder.text_completion("m", collected, collected.usage)["choices"]
    assert choice["stop_reason"] == expected and choice["finish_reason"] == "stop"
    [chat] = encoder.chat_completion("m", collected, collected.usage)["choices"]
    assert chat["stop_reason"] == expected
    enc = encoder.ChunkEncoder("m", chat=True, include_usage=False, stop_ids=stop_ids)
    assert "stop_reason" not in enc.delta(0, "x", None)["choices"][0]
    assert enc.delta(0, "", "stop", stop=match)["choices"][0]["stop_reason"] == expected
    assert enc.choice_chunk(0, {}, "stop", stop=match)["choices"][0]["stop_reason"] == expected


def chat(**kw) -> ChatCompletionRequest:  # type: ignore[no-untyped-def]
    return ChatCompletionRequest(model="m", **{
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1,"}],
        **kw})


def test_continue_final_message_continues_the_last_assistant_turn():
    gen = adapter.chat_request(chat(add_generation_prompt=False, continue_final_message=True))
    assert gen.continue_final_message and not gen.add_generation_prompt
    with pytest.raises(LmserveError) as exc:
        adapter.chat_request(chat(continue_final_message=True))
    assert exc.value.param == "add_generation_prompt"
    with pytest.raises(LmserveError) as exc:
        adapter.chat_request(chat(messages=[{"role": "user", "content": "hi"}],
                                  add_generation_prompt=False, continue_final_message=True))
    assert exc.value.param == "messages[0].role"
