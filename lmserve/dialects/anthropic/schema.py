"""Anthropic Messages API wire models (requests).

Unknown top-level fields are refused, as Anthropic's own API does, so a parameter this server
does not know is never dropped in silence. Content blocks stay lenient: clients feed response
blocks back with extra fields (citations, caller), and the adapter judges each block by type.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# vLLM's request priority: lower values are admitted first (engine.admission); default 0.
Priority = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]


class ContentBlock(BaseModel):
    """Any content block; the adapter reads the fields that belong to its `type`."""

    model_config = ConfigDict(extra="allow")

    type: str


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class MessageIn(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Metadata(_Strict):
    user_id: Annotated[str, Field(max_length=256)] | None = None


class MessagesBase(_Strict):
    """What /v1/messages and /v1/messages/count_tokens share: the prompt and its options."""

    model: str
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    # Prefix caching is automatic, so cache_control markers need no action; speed is a hint.
    cache_control: dict[str, Any] | None = None
    speed: Literal["standard", "fast"] | None = None
    # Refused by the adapter until the tools, reasoning and structured-output work lands.
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    context_management: dict[str, Any] | None = None


class MessageRequest(MessagesBase):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # 0 = off
    metadata: Metadata | None = None
    stream: bool = False
    # One local tier and one place: accepted, nothing to choose between.
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    # Refused by the adapter: server-side features this server does not have.
    container: str | dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    # lmserve extension: a conversation that does not fit the context (see chat.overflow)
    context_overflow: Literal["error", "truncate"] | None = None
    priority: Priority = 0  # lmserve extension (vLLM's field)
    # lmserve extension (Ollama's field): how long the model stays loaded after this request,
    # a duration ("5m") or seconds; 0: unload when idle; negative: forever
    keep_alive: float | str | None = None


class CountTokensRequest(MessagesBase):
    pass
