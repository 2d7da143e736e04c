"""OpenAI Responses wire models (requests) and the shape of the ids this server hands out.

Input items stay plain JSON here: the adapter checks them one by one, so an error can name the
exact item and field (`input[2].call_id`). Unknown top-level fields are tolerated, as in the
rest of the OpenAI dialect; known fields this server cannot honour are refused by the adapter.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JSON = dict[str, Any]

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# vLLM's request priority: lower values are admitted first (engine.admission); default 0.
Priority = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]


def new_id(prefix: str) -> str:
    """resp_..., msg_..., fc_...: OpenAI's ids are a type prefix, an underscore and hex."""
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseCreate(BaseModel):
    """POST /v1/responses (and the body of a WebSocket response.create)."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[JSON]
    instructions: str | None = None
    tools: list[JSON] | None = None
    tool_choice: str | JSON | None = None
    parallel_tool_calls: bool | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: JSON | None = None
    stream: bool | None = None
    stream_options: JSON | None = None  # include_obfuscation: no padding is ever added here
    text: JSON | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: JSON | None = None
    include: list[str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    background: bool | None = None
    conversation: str | JSON | None = None
    prompt: JSON | None = None
    # lmserve extensions, as in the chat completions endpoint
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    ignore_eos: bool = False
    priority: Priority = 0
