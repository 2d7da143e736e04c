"""`priority` (vLLM's field) in the native protocol, oLLM and Responses: each adapter carries
it into the neutral GenerationRequest that the engine's admission orders by; a value that is
not an integer (a bool, a float, a string, past 32 bits) is refused by the schema."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lmserve.core.request import ChatMessage
from lmserve.dialects.native import adapter as native
from lmserve.dialects.native.schema import GenerateBody
from lmserve.dialects.ollm import adapter as ollm
from lmserve.dialects.ollm.schema import GenerationIn, SessionCreateRequest
from lmserve.dialects.openai.responses import adapter as responses
from lmserve.dialects.openai.responses.schema import ResponseCreate

BAD = [True, 1.5, "1", 2**40]


def native_request(**fields: Any) -> int:
    body = GenerateBody.model_validate({"transport": "raw", "prompt": "hi", **fields})
    return native.generation_request(body, default_transport="raw",
                                     has_template=False, reasoning_default=False
                                     ).request.priority


def ollm_request(generation: dict[str, Any], turn: GenerationIn | None = None) -> int:
    stored = GenerationIn.model_validate(generation).model_dump(exclude_none=True)
    merged = ollm.merge_generation(stored, turn)
    return ollm.generation_request([ChatMessage("user", "hi")], merged, "m").priority


def responses_request(**fields: Any) -> int:
    body = ResponseCreate.model_validate({"model": "m", "input": "hi", **fields})
    return responses.generation_request(body, [ChatMessage("user", "hi")]).priority


def test_native_priority_reaches_the_request():
    assert native_request(priority=-3) == -3
    assert native_request() == 0


def test_ollm_priority_is_a_generation_setting_a_turn_may_override():
    assert ollm_request({"priority": 4}) == 4
    assert ollm_request({}) == 0
    assert ollm_request({"priority": 4}, GenerationIn(priority=-1)) == -1  # one turn's
    assert ollm_request({"priority": 4}, GenerationIn(max_new_tokens=2)) == 4  # the session's
    session = SessionCreateRequest.model_validate({"generation": {"priority": 2}})
    assert session.generation.priority == 2


def test_responses_priority_reaches_the_request():
    assert responses_request(priority=7) == 7
    assert responses_request() == 0


@pytest.mark.parametrize("value", BAD)
def test_a_priority_that_is_not_a_32_bit_integer_is_refused(value: Any):
    with pytest.raises(ValidationError):
        GenerateBody.model_validate({"prompt": "hi", "priority": value})
    with pytest.raises(ValidationError):
        GenerationIn.model_validate({"priority": value})
    with pytest.raises(ValidationError):
        ResponseCreate.model_validate({"model": "m", "input": "hi", "priority": value})
