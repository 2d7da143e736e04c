"""Ollama wire models (requests). Unknown top-level fields are tolerated, as Ollama's own server
does; fields whose behaviour lmserve does not implement are declared so the adapter can refuse
them by name. `options` stays a plain mapping here: the adapter checks each key itself, so an
unknown or misspelt option gets an error that names it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


Options = dict[str, Any] | None
KeepAlive = float | str | None  # a number of seconds or a Go-style duration ("5m", "-1")
Think = bool | Literal["low", "medium", "high"] | None
# vLLM's request priority: lower values are admitted first (engine.admission); default 0.
Priority = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class GenerationFields(_Lenient):
    model: str = ""  # required; an empty name gets Ollama's "model is required"
    stream: bool | None = None  # absent or null: stream
    options: Options = None
    format: str | dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Drop the oldest turns when the prompt overflows (null: the server's --context-overflow).
    truncate: bool | None = None
    priority: Priority = 0  # lmserve extension (vLLM's field)


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(default_factory=list)  # empty: just load the model
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(GenerationFields):
    prompt: str = ""  # empty: just load the model
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_Lenient):
    model: str = ""
    input: str | list[str] | None = None
    truncate: bool | None = None  # absent or null: truncate
    options: Options = None
    keep_alive: KeepAlive = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


class EmbeddingsRequest(_Lenient):
    """The legacy /api/embeddings body."""

    model: str = ""
    prompt: str = ""
    options: Options = None
    keep_alive: KeepAlive = None


class ShowRequest(_Lenient):
    model: str = ""
    name: str = ""  # the older spelling of `model`
    verbose: bool = False


class PullRequest(_Lenient):
    model: str = ""
    name: str = ""
    stream: bool | None = None
    insecure: bool = False


class OptionValues(BaseModel):
    """Types and ranges of the options lmserve acts on (Ollama's Modelfile parameters)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    num_predict: Annotated[int, Field(ge=-2)] | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=-1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Options that only have one value here; any other value is refused by the adapter.
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    penalize_newline: bool | None = None
    # Options that cannot change the output here (see adapter.NO_EFFECT).
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    num_keep: int | None = None
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
