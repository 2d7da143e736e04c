"""Pure translation: oLLM runtime and generation fields -> checks and a GenerationRequest;
session transcripts -> chat messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmserve.core.errors import invalid, unsupported
from lmserve.core.request import ChatMessage, FieldNames, GenerationRequest, SamplingParams
from lmserve.dialects.given import explicit
from lmserve.dialects.ollm.schema import GenerationIn, RuntimeIn

DEFAULT_MAX_NEW_TOKENS = 512
LLAMA_CPP = ("llama.cpp", "llama-cpp", "llamacpp", "llama_cpp")
# A runtime field is accepted when unset or set to what this server does anyway.
_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "backend": (None, *LLAMA_CPP), "device": (None, "cpu", "auto"),
    "use_cache": (None, True), "offload_cpu_layers": (None, 0),
    "multimodal": (None, False), "use_specialization": (None, False),
    "force_download": (None, False),
}
_WHY = {
    "backend": "this server runs GGUF models through llama.cpp only",
    "device": "this llama.cpp build runs on the CPU only (no GPU backend)",
    "use_cache": "the prefix cache is always on (POST /flush_cache drops it)",
    "offload_cpu_layers": "layers not on the GPU run on the CPU (offload_gpu_layers)",
    "offload_cpu_policy": "layers not on the GPU run on the CPU (offload_gpu_layers)",
    "multimodal": "this server takes text only",
    "use_specialization": "there are no specialized runtimes; llama.cpp runs every model",
    "force_download": "lmserve never downloads a model on request",
    "models_dir": "pass a GGUF path, a bundled name or a served name as model_reference",
    "adapter_dir": "LoRA adapters are not supported yet",
    "cache_dir": "the prefix cache lives in memory",
}
_UNSUPPORTED = ("models_dir", "adapter_dir", "cache_dir", "kv_cache_strategy",
                "strategy_selector_profile", "kv_cache_lifecycle", "kv_cache_adaptation_mode",
                "kv_cache_window_tokens", "dense_projection_chunk_rows", "offload_cpu_policy")
SERVED_KNOBS = ("context_length", "threads", "threads_batch", "parallel", "offload_gpu_layers")


def check_runtime(runtime: RuntimeIn, *, gpu: bool = False) -> None:
    """Refuse runtime fields this server cannot honour, naming them; `gpu`: llama.cpp was
    built with a GPU backend, so a GPU device can be asked for."""
    for name, accepted in _ACCEPTED.items():
        value = getattr(runtime, name)
        if name == "device" and gpu and str(value).lower() in ("gpu", "cuda", "metal"):
            continue
        if (value.lower() if isinstance(value, str) else value) not in accepted:
            raise unsupported(f"runtime.{name}", f"{value!r}: {_WHY[name]}")
    for name in _UNSUPPORTED:
        if getattr(runtime, name) is not None:
            raise unsupported(f"runtime.{name}", _WHY.get(name, "llama.cpp manages its KV "
                                                               "cache itself on this server"))


def check_served(runtime: RuntimeIn, running: Mapping[str, int]) -> None:
    """A prompt runs on the engine as started: a differing knob cannot apply to one request."""
    for name in SERVED_KNOBS:
        wanted = getattr(runtime, name)
        if wanted is not None and wanted != running.get(name):
            raise unsupported(f"runtime.{name}",
                              f"the served model runs with {name}={running.get(name)}; "
                              f"restart the server to change it (POST /v1/plan plans any value)")


def merge_generation(stored: Mapping[str, Any], override: GenerationIn | None) -> GenerationIn:
    """A session's settings with one turn's overrides on top."""
    values = dict(stored)
    if override is not None:
        values.update(override.model_dump(exclude_none=True))
    return GenerationIn.model_validate(values)


def generation_request(messages: list[ChatMessage], gen: GenerationIn,
                       model: str | None) -> GenerationRequest:
    defaults = SamplingParams()
    return GenerationRequest(
        model=model, messages=messages,
        sampling=SamplingParams(
            temperature=defaults.temperature if gen.temperature is None else gen.temperature,
            top_p=defaults.top_p if gen.top_p is None else gen.top_p,
            top_k=gen.top_k or 0, seed=gen.seed), fields=FieldNames("generation."),
        max_tokens=gen.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        stop=[s for s in gen.stop or [] if s], context_overflow=gen.context_overflow,
        priority=gen.priority or 0, explicit=explicit(gen, {"max_new_tokens": "max_tokens"}))


def prompt_messages(system: str | None, transcript: Sequence[Mapping[str, Any]],
                    prompt: str) -> list[ChatMessage]:
    """System prompt, earlier turns verbatim (so the rendered history extends the previous
    turn's tokens and its KV is reused), then the new user prompt."""
    messages = [ChatMessage(role="system", content=system)] if system else []
    for index, message in enumerate(transcript):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system") or not isinstance(content, str):
            raise invalid(f"the stored transcript has an unreadable message at {index}",
                          param="session_id")
        messages.append(ChatMessage(role=role, content=content))
    messages.append(ChatMessage(role="user", content=prompt))
    return messages
