"""Native wire models: the body of query/ and stream/, and PUT's body."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Transport = Literal["raw", "chat", "conversation"]
# vLLM's request priority: lower values are admitted first (engine.admission); default 0.
Priority = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]


class ToolCallIn(BaseModel):
    """A call the assistant made, as a tool block reported it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ImageIn(BaseModel):
    """One image: exactly one of `url` (a data:, http(s) or file:// URL), `data` (base64,
    with an optional `media_type`) or `path` (a file under the server's media directory)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    data: str | None = None
    media_type: str | None = None
    path: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = Field(max_length=10_000_000)
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this result answers
    images: list[ImageIn] | None = None


class GenerateBody(BaseModel):
    """POST P query/ and P stream/."""

    model_config = ConfigDict(extra="forbid")

    transport: Transport | None = None
    prompt: str | None = None
    system: str | None = None
    messages: list[Message] | None = None
    images: list[ImageIn] | None = None  # transport chat: images for the prompt
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    priority: Priority = 0


class ConfigureBody(BaseModel):
    """PUT P."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any]
