"""SGLang runtime API wire models (the seed 001 server, pymllm, and SGLang's own /generate).

The top level tolerates unknown fields as SGLang's dataclass does; `sampling_params` is strict,
as SGLang's SamplingParams(**params) is, so a misspelt parameter fails by name instead of being
dropped. Fields this server does not implement are refused by the adapter.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# vLLM's request priority: lower values are admitted first (engine.admission); default 0.
Priority = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]
# One stop string or a list of them, held as a list (no union, so errors name the item).
Stops = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                  Field(max_length=16)]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Annotated[int, Field(ge=0)] | None = 128
    stop: Stops | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: Any = None
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: int = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] = 1.0
    min_new_tokens: Annotated[int, Field(ge=0)] = 0
    n: Annotated[int, Field(ge=1, le=128)] = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    json_schema: str | dict[str, Any] | None = None  # JSON text, or the schema object
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    sampling_seed: int | None = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("top_k must be -1 (disabled) or at least 1")
        return value


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    # Checked against SamplingParams by the adapter, so errors name e.g. sampling_params[1].top_k
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    model: str | None = None  # lmserve: which served model (default: the only one)
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[Any] | None = None
    return_text_in_logprobs: bool = False
    lora_path: str | list[str | None] | None = None
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    input_embeds: Any = None
    session_params: dict[str, Any] | list[Any] | None = None
    custom_logit_processor: str | list[Any] | None = None
    return_hidden_states: bool | list[bool] = False
    priority: Priority = 0  # SGLang's field: applies to every prompt of a batch


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    rid: str | None = None
    abort_all: bool = False
