"""oLLM local-server wire models (seed 002). Like oLLM's own models they forbid unknown fields;
runtime fields that make no sense for llama.cpp on this server are refused by the adapter.

lmserve additions: `context_length`, `threads`, `threads_batch` and `parallel` in `runtime`
(planned by /v1/plan; a prompt must match the served runtime), `stop`, `context_overflow` and
`priority` (vLLM's field) in `generation`, and an optional per-turn `generation` on a session
prompt."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Positive = Annotated[int, Field(gt=0)]
# vLLM's request priority: lower values are admitted first (engine.admission); None: 0.
Priority = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeIn(_Strict):
    model_reference: str | None = None
    models_dir: str | None = None
    device: str | None = None
    backend: str | None = None
    adapter_dir: str | None = None
    multimodal: bool | None = None
    use_specialization: bool | None = None
    cache_dir: str | None = None
    use_cache: bool | None = None
    kv_cache_strategy: str | None = None
    strategy_selector_profile: str | None = None
    kv_cache_lifecycle: str | None = None
    kv_cache_adaptation_mode: str | None = None
    kv_cache_window_tokens: Positive | None = None
    dense_projection_chunk_rows: Positive | None = None
    offload_cpu_layers: Annotated[int, Field(ge=0)] | None = None
    offload_cpu_policy: str | None = None
    offload_gpu_layers: Annotated[int, Field(ge=0)] | None = None
    force_download: bool | None = None
    stats: bool | None = None
    verbose: bool | None = None
    quiet: bool | None = None
    context_length: Annotated[int, Field(ge=16)] | None = None
    threads: Positive | None = None
    threads_batch: Positive | None = None
    parallel: Annotated[int, Field(gt=0, le=256)] | None = None


class GenerationIn(_Strict):
    max_new_tokens: Positive | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Positive | None = None
    seed: int | None = None
    stop: Annotated[list[str], Field(max_length=16)] | None = None
    # a transcript that outgrows the context: refuse (error) or drop its oldest turns
    context_overflow: Literal["error", "truncate"] | None = None
    priority: Priority | None = None  # lmserve extension (vLLM's field)


class PlanRequest(_Strict):
    runtime: RuntimeIn = Field(default_factory=RuntimeIn)


class PromptRequest(_Strict):
    prompt: str
    system_prompt: str | None = None  # None: the chat template's own default
    runtime: RuntimeIn = Field(default_factory=RuntimeIn)
    generation: GenerationIn = Field(default_factory=GenerationIn)


class SessionCreateRequest(_Strict):
    session_name: str = "default"
    system_prompt: str | None = None
    runtime: RuntimeIn = Field(default_factory=RuntimeIn)
    generation: GenerationIn = Field(default_factory=GenerationIn)


class SessionPromptRequest(_Strict):
    prompt: str
    generation: GenerationIn | None = None  # per-turn overrides of the session's settings
