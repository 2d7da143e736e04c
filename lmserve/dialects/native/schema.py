"""Native wire models: the body of query/ and stream/, and PUT's body."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Transport = Literal["raw", "chat", "conversation"]
MAX_CONTENT = 10_000_000  # characters of one message's text
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


class AudioIn(ImageIn):
    """One audio clip (WAV or MP3): exactly one of `url` (a data:, http(s) or file:// URL),
    `data` (base64, with an optional `media_type`: audio/wav, audio/mpeg) or `path` (a file
    under the server's media directory)."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string, or a list of typed parts ({"type": "text" | "image:url" | "image:uri" |
    # "audio:url" | "audio:uri", ...}) that dialects.native.content reads and checks, naming
    # the part's field in its refusals; at most MAX_CONTENT characters of text (the adapter)
    content: str | list[Any]
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this result answers
    images: list[ImageIn] | None = None
    audio: list[AudioIn] | None = None


class GenerateBody(BaseModel):
    """POST P query/ and P stream/."""

    model_config = ConfigDict(extra="forbid")

    transport: Transport | None = None
    prompt: str | list[Any] | None = None  # a list of content parts: transport chat only
    system: str | None = None
    messages: list[Message] | None = None
    images: list[ImageIn] | None = None  # transport chat: images for the prompt
    audio: list[AudioIn] | None = None  # transport chat: audio clips for the prompt
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
