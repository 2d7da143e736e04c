"""Native wire models: the body of query/ and stream/, and PUT's body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Transport = Literal["raw", "chat", "conversation"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = Field(max_length=10_000_000)
    name: str | None = None


class GenerateBody(BaseModel):
    """POST P query/ and P stream/."""

    model_config = ConfigDict(extra="forbid")

    transport: Transport | None = None
    prompt: str | None = None
    system: str | None = None
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] | None = None


class ConfigureBody(BaseModel):
    """PUT P."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any]
