"""Pure translation: a backend's choice steps and model card -> Ollama JSON bodies and NDJSON
frames."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from gguf import LlamaFileType

from lmserve.core.backend import ChoiceStep, Failed, PlacementFacts, WeightsFacts
from lmserve.core.errors import LmserveError
from lmserve.core.events import (
    CHANNEL_REASONING,
    FINISH_LENGTH,
    ChatEvent,
    TextDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.core.observe import with_request_id
from lmserve.dialects.ollama.logprobs import logprob_entries

# lmserve keeps every model loaded while it runs; Ollama clients show a far-future expiry as
# "Forever".
NEVER_EXPIRES = "9999-12-31T23:59:59Z"


def error_body(exc: LmserveError) -> dict[str, Any]:
    return with_request_id({"error": exc.message})


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 in UTC with a Z, as Ollama writes created_at and modified_at."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == FINISH_LENGTH else "stop"


def _head(model: str, chat: bool, text: str, done: bool, thinking: str = "",
          tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if chat:
        body["message"] = {"role": "assistant", "content": text}
        if thinking:
            body["message"]["thinking"] = thinking
        if tool_calls:
            body["message"]["tool_calls"] = tool_calls
    else:
        body["response"] = text
        if thinking:
            body["thinking"] = thinking
    body["done"] = done
    return body


def tool_call(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A finished call as Ollama writes it: the arguments as an object."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = {}
    return {"id": call_id, "function": {"index": index, "name": name,
                                        "arguments": value if isinstance(value, dict) else {}}}


def load_response(model: str, *, chat: bool, unload: bool = False) -> dict[str, Any]:
    """The answer to an empty prompt or message list: the model is loaded and ready (or,
    with keep_alive 0, unloaded)."""
    return {**_head(model, chat, "", True), "done_reason": "unload" if unload else "load"}


@dataclass
class Run:
    """One generation as Ollama reports it: text, token ids, counts, nanosecond timings.

    Timings come from time.monotonic_ns() readings taken by the route: started (request in),
    loaded (model ready), submitted (sent to the engine), the first token, and the end.
    prompt_eval_duration is the time to the first token; eval_duration the rest.
    With logprobs asked for, each frame carries its step's (a step whose text a parser holds
    back still sends them, as Ollama does) and a non-streamed body carries them all.
    """

    model: str
    chat: bool
    started_ns: int
    loaded_ns: int
    submitted_ns: int
    prompt_ids: list[int] | None = None  # set when the final frame carries `context`
    show_thinking: bool = True  # False (think: false): reasoning is dropped
    text: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    first_ns: int | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    failed: Failed | None = None  # how the choice failed, if it did
    logprobs: list[dict[str, Any]] | None = None  # None: not asked for

    _calls: dict[int, ToolCallStart] = field(default_factory=dict, repr=False)

    def add(self, step: ChoiceStep, now_ns: int) -> dict[str, Any] | None:
        """Record one step (its events: its text as the chat parser read it); returns the
        frame to stream when it carries text, thinking or finished tool calls."""
        if self.first_ns is None and step.token_ids:
            self.first_ns = now_ns
        self.output_ids += step.token_ids
        if step.finished:
            self.finish_reason, self.usage, self.failed = \
                step.finish_reason, step.usage, step.failed
        text, thinking, calls = self._read(step.events)
        logprobs = logprob_entries(step.logprobs) if step.logprobs is not None else None
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs
        if not (text or thinking or calls or logprobs):
            return None
        frame = _head(self.model, self.chat, text, False, thinking, calls)
        return {**frame, "logprobs": logprobs} if logprobs else frame

    def _read(self, events: list[ChatEvent]) -> tuple[str, str, list[dict[str, Any]]]:
        text, thinking, calls = "", "", []
        for event in events:
            if isinstance(event, TextDelta) and event.channel == CHANNEL_REASONING:
                thinking += event.text if self.show_thinking else ""
            elif isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, ToolCallStart):
                self._calls[event.index] = event
            elif isinstance(event, ToolCallEnd):
                start = self._calls.pop(event.index)
                calls.append(tool_call(event.index, start.id, start.name, event.arguments))
        self.text, self.thinking = self.text + text, self.thinking + thinking
        self.tool_calls += calls
        return text, thinking, calls

    def final(self, now_ns: int, *, streamed: bool) -> dict[str, Any]:
        """The done frame; without streaming it is the whole response and holds all the text."""
        body = _head(self.model, self.chat, "" if streamed else self.text, True,
                     "" if streamed else self.thinking, None if streamed else self.tool_calls)
        body["done_reason"] = done_reason(self.finish_reason)
        if self.prompt_ids is not None:
            body["context"] = self.prompt_ids + self.output_ids
        if self.logprobs is not None and not streamed:
            body["logprobs"] = self.logprobs
        return {**body, **self.metrics(now_ns)}

    def metrics(self, now_ns: int) -> dict[str, int]:
        first = self.first_ns if self.first_ns is not None else now_ns
        usage = self.usage or Usage()
        return {"total_duration": now_ns - self.started_ns,
                "load_duration": self.loaded_ns - self.started_ns,
                "prompt_eval_count": usage.prompt_tokens,
                "prompt_eval_duration": first - self.submitted_ns,
                "eval_count": usage.completion_tokens,
                "eval_duration": now_ns - first}


# -- the model catalogue: /api/tags, /api/ps, /api/show --------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """What the routes gather about one served name, from its file and its loaded model."""

    name: str
    path: str
    size: int  # bytes on disk
    modified: datetime
    digest: str
    architecture: str = ""
    n_params: int = 0
    file_type: int | None = None


def model_facts(name: str, path: str, size: int, mtime_ns: int, weights: WeightsFacts | None,
                metadata: Mapping[str, str] | None = None) -> ModelFacts:
    """File facts plus, once loaded, the weights'; the digest is sha256 of path, size, mtime.
    `metadata`: the GGUF's metadata as llama.cpp reads it (values as strings), where known."""
    digest = hashlib.sha256(f"{path}|{size}|{mtime_ns}".encode()).hexdigest()
    facts = ModelFacts(name=name, path=path, size=size, digest=digest,
                       modified=datetime.fromtimestamp(mtime_ns / 1e9, tz=UTC))
    if weights is None:
        return facts
    file_type = metadata_value((metadata or {}).get("general.file_type", ""))
    return dataclasses.replace(facts, architecture=weights.architecture or "",
                               n_params=weights.n_params or 0,
                               file_type=file_type if isinstance(file_type, int) else None)


def parameter_size(n_params: int) -> str:
    """Ollama's spelling: 8.0B, 134.52M, 500K."""
    for scale, suffix, decimals in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n_params >= scale:
            value = n_params / scale
            return f"{value:.0f}{suffix}" if value == int(value) else \
                f"{value:.{decimals}f}{suffix}"
    return str(n_params) if n_params else ""


def quantization_level(file_type: int | None) -> str:
    """llama.cpp's file type number as Ollama names it (Q4_K_M, Q8_0, F16, ...)."""
    try:
        name = LlamaFileType(file_type).name  # type: ignore[arg-type]
    except ValueError:
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def details(facts: ModelFacts) -> dict[str, Any]:
    arch = facts.architecture
    return {"parent_model": "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": parameter_size(facts.n_params),
            "quantization_level": quantization_level(facts.file_type)}


def tag_entry(facts: ModelFacts) -> dict[str, Any]:
    return {"name": facts.name, "model": facts.name, "modified_at": timestamp(facts.modified),
            "size": facts.size, "digest": facts.digest, "details": details(facts)}


def ps_entry(facts: ModelFacts, weights: WeightsFacts, n_ctx: int,
             metadata: Mapping[str, str] | None = None,
             placement: PlacementFacts | None = None, *, expires_at: float | None = None
             ) -> dict[str, Any]:
    """`size` is the weights plus the KV cache allocated for the loaded context: the backend's
    own figure (all streams, in its KV types) where it gives one, else f16 cells of one
    context from the metadata's attention shapes. `size_vram` is what sits on the GPU."""
    metadata = metadata or {}
    arch = weights.architecture or ""
    n_layer = metadata_value(metadata.get(f"{arch}.block_count", ""))
    kv = kv_cache_bytes(metadata, arch, n_layer, n_ctx) if isinstance(n_layer, int) else 0
    vram = 0
    if placement is not None and placement.kv_bytes:
        kv = placement.kv_bytes
        vram = placement.weights_gpu_bytes + (kv if placement.kv_where == "gpu" else 0)
    memory = (weights.size_bytes or 0) + kv
    return {"name": facts.name, "model": facts.name, "size": memory, "digest": facts.digest,
            "details": details(facts), "size_vram": vram,
            "expires_at": NEVER_EXPIRES if expires_at is None else
            timestamp(datetime.fromtimestamp(expires_at, UTC)),
            "context_length": n_ctx}


def kv_cache_bytes(raw_metadata: Mapping[str, str], arch: str, n_layer: int, n_ctx: int) -> int:
    """The f16 KV cache llama.cpp allocates: n_ctx cells of K and V rows on every layer."""
    metadata = {k: metadata_value(v) for k, v in raw_metadata.items()}
    heads = metadata.get(f"{arch}.attention.head_count")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    width = metadata.get(f"{arch}.embedding_length")
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and isinstance(width, int)
            and min(heads, kv_heads, width) > 0):
        return 0
    key = metadata.get(f"{arch}.attention.key_length", width // heads)
    value = metadata.get(f"{arch}.attention.value_length", width // heads)
    return int(n_ctx * n_layer * kv_heads * (key + value) * 2)


_INT = re.compile(r"-?\d+")


def metadata_value(text: str) -> Any:
    """llama.cpp hands GGUF values over as strings; give numbers and booleans their type."""
    if text in ("true", "false"):
        return text == "true"
    if _INT.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def model_info(metadata: Mapping[str, str], n_params: int) -> dict[str, Any]:
    info = {k: metadata_value(v) for k, v in sorted(metadata.items())
            if k != "tokenizer.chat_template"}  # served as `template`
    info.setdefault("general.parameter_count", n_params)
    return info


def parameters_text(parameters: dict[str, Any]) -> str:
    return "\n".join(f"{key:<30} {value}" for key, value in parameters.items())


def modelfile(facts: ModelFacts, template: str, parameters: dict[str, Any]) -> str:
    lines = [f'# Modelfile generated by lmserve for "{facts.name}"',
             "# lmserve serves the models it was started with; the TEMPLATE below is the",
             "# GGUF's Jinja chat template, which lmserve renders (not a Go template).",
             "", f"FROM {facts.path}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER {key} {value}" for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def show_body(facts: ModelFacts, metadata: Mapping[str, str], *, template: str,
              parameters: dict[str, Any], vision: bool = False) -> dict[str, Any]:
    # Every model here embeds (mean pooling when the GGUF declares none), so both are listed.
    return {"license": metadata.get("general.license", ""),
            "modelfile": modelfile(facts, template, parameters),
            "parameters": parameters_text(parameters), "template": template,
            "details": details(facts), "model_info": model_info(metadata, facts.n_params),
            "capabilities": ["completion", "embedding", *(["vision"] if vision else [])],
            "modified_at": timestamp(facts.modified)}


def embedding(vector: np.ndarray, dimensions: int | None = None) -> list[float]:
    """L2-normalised, as Ollama's /api/embed returns them; `dimensions` keeps the leading ones."""
    vector = vector[:dimensions] if dimensions else vector
    return [float(x) for x in vector / max(float(np.linalg.norm(vector)), 1e-12)]


def embed_response(model: str, vectors: list[np.ndarray], dimensions: int | None, n_tokens: int,
                   *, started_ns: int, loaded_ns: int, now_ns: int) -> dict[str, Any]:
    return {"model": model, "embeddings": [embedding(v, dimensions) for v in vectors],
            "total_duration": now_ns - started_ns, "load_duration": loaded_ns - started_ns,
            "prompt_eval_count": n_tokens}
