"""Pure runtime planning for /v1/plan: what llama.cpp would be given for a GGUF model on this
server, how much memory that takes, and why each value was chosen. Nothing is loaded: the facts
come from the GGUF header, the settings from the server and the request.

The KV layout rule is the engine's (lmserve.engine.kv_layout, a pure module): a plan for a model
that is not served must size it as the engine would, so this is the one dialect module that
imports from the engine layer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.engine import hardware, kv_layout

F32_BYTES = 4
MIB = 1024 * 1024
DEFAULT_CTX_CAP = kv_layout.DEFAULT_CTX_CAP  # the training context, capped (service.py)
FALLBACK_CTX = kv_layout.FALLBACK_CTX


@dataclass(frozen=True)
class ModelFacts:
    """What the GGUF header says about the model's shape."""

    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_embd: int
    n_vocab: int
    context_train: int | None
    quantization: str | None
    size_bytes: int
    name: str | None
    chat_template: bool

    def kv_bytes(self, type_k: str, type_v: str) -> int:
        """K and V rows for one cell, on every layer, in the given KV cache types."""
        return kv_layout.kv_bytes_per_token(self.n_layer, self.n_head_kv, self.key_length,
                                            self.value_length, type_k, type_v)

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V rows for one cell, on every layer."""
        return kv_layout.kv_bytes_per_token(self.n_layer, self.n_head_kv, self.key_length,
                                            self.value_length)


def facts_from_header(metadata: Mapping[str, Any], *, size_bytes: int,
                      quantization: str | None) -> ModelFacts:
    arch = str(metadata.get("general.architecture", "unknown"))

    def number(key: str, default: int = 0) -> int:
        value = metadata.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else default

    n_embd = number(f"{arch}.embedding_length")
    n_head = number(f"{arch}.attention.head_count")
    head_width = n_embd // n_head if n_head else 0
    return ModelFacts(
        architecture=arch, n_layer=number(f"{arch}.block_count"), n_head=n_head,
        n_head_kv=number(f"{arch}.attention.head_count_kv", n_head),
        key_length=number(f"{arch}.attention.key_length", head_width),
        value_length=number(f"{arch}.attention.value_length", head_width),
        n_embd=n_embd,
        n_vocab=number(f"{arch}.vocab_size") or number("tokenizer.ggml.tokens"),
        context_train=number(f"{arch}.context_length") or None,
        quantization=quantization, size_bytes=size_bytes,
        name=metadata.get("general.name"),
        chat_template=isinstance(metadata.get("tokenizer.chat_template"), str))


@dataclass(frozen=True)
class Choice:
    value: int
    reason: str


@dataclass(frozen=True)
class Knobs:
    context: Choice
    threads: Choice
    threads_batch: Choice
    parallel: Choice
    step_tokens: Choice
    cache_slots: Choice
    cache_tokens: Choice
    kv_split: bool = False  # one stream of `context` cells per slot (engine.kv_layout)
    disk_cache: bool = False  # --disk-cache is set
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    offload: hardware.Offload = hardware.Offload(0, 0, "CPU only")  # layers on the GPU

    @property
    def n_ubatch(self) -> int:
        return max(self.step_tokens.value, self.parallel.value)

    @property
    def n_seq_max(self) -> int:
        return self.parallel.value + self.cache_slots.value


def running_offload(layers: int, n_layer: int, reason: str, kv_on_gpu: bool
                    ) -> hardware.Offload:
    """A served model's GPU layers (its card's placement) as the plan rules state them."""
    return hardware.Offload(layers, n_layer, reason, kv_on_gpu)


def default_threads() -> int:
    """The threads lmserve's engine takes when --threads is unset: every CPU core."""
    return max(1, os.cpu_count() or 1)


def machine_memory() -> int | None:
    """The machine's memory, which the auto KV layout weighs (engine.kv_layout)."""
    return kv_layout.machine_memory()


def choose(facts: ModelFacts, configured: Mapping[str, Any], requested: Mapping[str, Any], *,
           cpu_count: int, running_ctx: int | None = None, memory: int | None = None,
           running_layout: kv_layout.Layout | str | None = None,
           running_offload: hardware.Offload | None = None,
           gpu: tuple[bool, list[hardware.Device]] = (False, [])) -> Knobs:
    """configured: the server's engine settings (None: default); requested: the plan request's
    overrides; running_ctx, running_layout and running_offload: the context, KV layout and
    GPU layers of the engine already serving this model (a Layout, or as a model card names
    it: "split" or "shared"); memory: the machine's, which the auto KV layout weighs
    (engine.kv_layout); gpu: whether llama.cpp has a GPU backend, and its GPUs."""
    context = _context(facts, configured.get("n_ctx"), requested.get("context_length"),
                       running_ctx)
    type_k = str(configured.get("cache_type_k") or "f16")
    type_v = str(configured.get("cache_type_v") or "f16")
    threads = _pick(requested.get("threads"), configured.get("threads"), cpu_count,
                    "--threads", f"all {cpu_count} CPU cores (lmserve's default)")
    batch_default = Choice(threads.value, "the same as threads (--threads-batch unset)")
    threads_batch = _pick(requested.get("threads_batch"), configured.get("threads_batch"),
                          batch_default.value, "--threads-batch", batch_default.reason)
    parallel = _pick(requested.get("parallel"), configured.get("parallel"), 8, "--parallel",
                     "lmserve's default")
    configured_slots = configured.get("cache_slots")
    idle_slots = kv_layout.default_cache_slots(parallel.value) if configured_slots is None \
        else int(configured_slots)
    n_slots = parallel.value + idle_slots
    running = running_layout is not None and requested.get("context_length") is None and \
        requested.get("parallel") is None
    if isinstance(running_layout, kv_layout.Layout) and running:
        layout = running_layout  # what the engine was given, a fallback included
    else:
        layout = kv_layout.choose(str(configured.get("kv_layout") or "auto"),
                                  bytes_per_token=facts.kv_bytes(type_k, type_v) or None,
                                  n_ctx=context.value, n_slots=n_slots, memory=memory)
        if isinstance(running_layout, str) and running:
            layout = _engine_layout(running_layout == "split", layout, context.value, n_slots)
    split = layout.split
    parallel = Choice(parallel.value, parallel.reason + "; KV: " + layout.reason + (
        "" if split else "; one sequence may use all of it"))
    step = int(configured.get("step_tokens") or 512)
    cache_tokens = configured.get("cache_tokens")
    idle_default = 0 if split else context.value // 4  # split: no budget, idle KV is free
    return Knobs(
        context=context, threads=threads, threads_batch=threads_batch, parallel=parallel,
        step_tokens=Choice(step, "tokens per engine step (--batch): decode tokens first, then "
                           "prompt chunks; llama.cpp's n_batch = n_ubatch = max(batch, parallel)"),
        cache_slots=Choice(idle_slots,
                           "finished sequences kept resident for prefix reuse (--cache-slots, "
                           "default: a quarter of --parallel, at least 1)"),
        cache_tokens=Choice(idle_default if cache_tokens is None else int(cache_tokens),
                            "idle KV tokens kept besides the newest finished conversation "
                            "(--cache-tokens; default a quarter of the context, as idle cells "
                            "slow every decode step of a shared pool; 0 = no budget with "
                            "--kv-split, where they do not)"),
        kv_split=split, disk_cache=bool(configured.get("disk_cache_dir")),
        cache_type_k=type_k, cache_type_v=type_v,
        offload=running_offload if running_offload is not None and running and
        requested.get("offload_gpu_layers") is None else hardware.offload(
            str(requested.get("offload_gpu_layers") if requested.get("offload_gpu_layers")
                is not None else configured.get("gpu_layers") or "auto"),
            n_layer=facts.n_layer, size_bytes=facts.size_bytes,
            kv_bytes=facts.kv_bytes(type_k, type_v) * context.value * (n_slots if split else 1),
            kv_offload=bool(configured.get("kv_offload", True)), devices=gpu[1],
            gpu_build=gpu[0]))


def _engine_layout(split: bool, rule: kv_layout.Layout, n_ctx: int, n_slots: int
                   ) -> kv_layout.Layout:
    """The layout the engine serving the model runs, with the rule's reason where the rule
    agrees; where it does not, the engine's auto fell back to one pool when it started."""
    if split == rule.split:
        return rule
    if split:
        return kv_layout.Layout(True, f"a KV stream of {n_ctx} cells per slot ({n_slots} "
                                      "slots), as the engine serving this model runs")
    return kv_layout.Layout(False, f"one KV pool of {n_ctx} cells shared by all {n_slots} "
                                   "slots, as the engine serving this model runs (auto: a "
                                   "stream per slot could not be made when it started)")


def _pick(requested: Any, configured: Any, default: int, flag: str, why_default: str) -> Choice:
    if requested is not None:
        return Choice(int(requested), "requested in this plan")
    if configured is not None:
        return Choice(int(configured), f"this server's {flag}")
    return Choice(default, why_default)


def _context(facts: ModelFacts, configured: Any, requested: Any, running: int | None) -> Choice:
    train = facts.context_train
    if requested is not None:
        value, why = int(requested), "requested in this plan"
    elif running:
        value, why = running, "the context of the engine serving this model now"
    elif configured is not None:
        value, why = int(configured), "this server's --ctx"
    elif train:
        value = min(train, DEFAULT_CTX_CAP)
        why = f"the model's training context ({train})" + \
            (f", capped at {DEFAULT_CTX_CAP} (lmserve's default)" if train > DEFAULT_CTX_CAP
             else " (lmserve's default)")
    else:
        value, why = FALLBACK_CTX, "the header names no training context; lmserve's fallback"
    if train and value > train:
        why += f"; beyond the training context ({train}): expect degraded output"
    return Choice(value, why)


def memory(facts: ModelFacts, knobs: Knobs, *, available: int | None) -> dict[str, Any]:
    cells = knobs.context.value * (knobs.n_seq_max if knobs.kv_split else 1)
    per_token = facts.kv_bytes(knobs.cache_type_k, knobs.cache_type_v)
    kv = per_token * cells
    offload = knobs.offload
    gpu_weights = offload.weights_on_gpu(facts.size_bytes) if offload.n_layer else 0
    compute = knobs.n_ubatch * (facts.n_vocab + 2 * facts.n_embd) * F32_BYTES
    output = knobs.n_seq_max * facts.n_vocab * F32_BYTES
    total = facts.size_bytes + kv + compute + output
    return {"weights_bytes": facts.size_bytes, "kv_cache_bytes": kv,
            "kv_bytes_per_token": per_token,
            "kv_cache_type": knobs.cache_type_k if knobs.cache_type_k == knobs.cache_type_v
            else f"{knobs.cache_type_k}/{knobs.cache_type_v}",
            "kv_cache_type_k": knobs.cache_type_k, "kv_cache_type_v": knobs.cache_type_v,
            "gpu_layers": offload.layers, "weights_gpu_bytes": gpu_weights,
            "kv_cache_gpu_bytes": offload.kv_on_gpu_bytes(kv),
            "compute_buffer_bytes": compute, "output_buffer_bytes": output,
            "total_bytes": total, "available_bytes": available,
            "fits": None if available is None else total <= available}


def reasons(facts: ModelFacts, knobs: Knobs, mem: dict[str, Any]) -> dict[str, str]:
    f, k = facts, knobs
    fit = "unknown (available memory could not be read)" if mem["fits"] is None else \
        ("fits" if mem["fits"] else "does NOT fit") + \
        f" in the {_mib(mem['available_bytes'])} available now"
    return {
        "backend": f"llama.cpp: lmserve serves GGUF files through llama.cpp; architecture "
                   f"'{f.architecture}'" + ("" if f.chat_template else
                                            "; no chat template, so prompts need one "
                                            "(--chat-template) or raw text"),
        "context": f"{k.context.value} tokens: {k.context.reason}",
        "threads": f"{k.threads.value} for decoding: {k.threads.reason}; "
                   f"{k.threads_batch.value} for prompts: {k.threads_batch.reason}",
        "parallel": f"{k.parallel.value} sequences: {k.parallel.reason}",
        "offload": f"{k.offload.where}: {k.offload.reason}" + (
            "; weights, KV cache and buffers stay in system memory"
            if k.offload.layers == 0 else ""),
        "weights": f"{_mib(f.size_bytes)}: the GGUF file is memory-mapped, so its size is what "
                   f"the weights take ({f.quantization or 'unknown'} quantization)",
        "kv_cache": f"{_mib(mem['kv_cache_bytes'])} = {f.n_layer} layers x "
                    f"{_cells(k)} cells x {f.n_head_kv} KV heads x ({f.key_length} + "
                    f"{f.value_length}) x the bytes of {k.cache_type_k}/{k.cache_type_v} "
                    f"elements, " +
                    (f"one stream per slot ({k.n_seq_max} slots)" if k.kv_split else
                     "one unified pool for all sequences"),
        "compute_buffer": f"about {_mib(mem['compute_buffer_bytes'])}: one micro-batch of "
                          f"{k.n_ubatch} tokens, mostly its logits ({f.n_vocab} x f32 per "
                          "token); an estimate",
        "output_buffer": f"{_mib(mem['output_buffer_bytes'])}: logits for {k.n_seq_max} "
                         "sequence slots (parallel + cache slots)",
        "cache": f"prefix cache on: {k.cache_slots.value} idle slots, up to "
                 f"{k.cache_tokens.value} idle tokens; {k.cache_slots.reason}; "
                 f"{k.cache_tokens.reason}",
        "memory": f"{_mib(mem['total_bytes'])} in total, which {fit}",
    }


def _cells(k: Knobs) -> str:
    return f"{k.n_seq_max} x {k.context.value}" if k.kv_split else str(k.context.value)


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:.1f} MiB"


@dataclass(frozen=True)
class Target:
    """The model a plan is for: the reference as given and where it led."""

    reference: str
    name: str
    source: str  # "served" | "file" | "bundled" | "huggingface"
    path: str
    served_as: str | None = None
    loaded: bool = False


def plan_body(target: Target, facts: ModelFacts, knobs: Knobs,
              mem: dict[str, Any]) -> dict[str, Any]:
    """oLLM's plan shape: runtime_config, resolved_model, runtime_plan (reason + details)."""
    details = reasons(facts, knobs, mem)
    fit = "" if mem["fits"] is None else (", fits in memory" if mem["fits"]
                                          else ", does NOT fit in available memory")
    device = {"cpu": "on the CPU", "gpu": "on the GPU", "split": "on the GPU and CPU"}[
        knobs.offload.where]
    summary = (f"{target.name}: llama.cpp {device}, {knobs.context.value}-token context, "
               f"{knobs.parallel.value} parallel sequences, {knobs.threads.value} threads; "
               f"about {_mib(mem['total_bytes'])}{fit}")
    return {
        "runtime_config": {
            "model_reference": target.reference, "backend": "llama.cpp",
            "device": "cpu" if knobs.offload.layers == 0 else "gpu",
            "context_length": knobs.context.value, "threads": knobs.threads.value,
            "threads_batch": knobs.threads_batch.value, "parallel": knobs.parallel.value,
            "step_tokens": knobs.step_tokens.value, "cache_slots": knobs.cache_slots.value,
            "cache_tokens": knobs.cache_tokens.value, "use_cache": True,
            "kv_unified": not knobs.kv_split, "disk_cache": knobs.disk_cache,
            "offload_gpu_layers": knobs.offload.layers,
            "cache_type_k": knobs.cache_type_k, "cache_type_v": knobs.cache_type_v},
        "resolved_model": {
            "model_reference": target.reference, "normalized_name": target.name,
            "source_kind": target.source, "path": target.path,
            "architecture": facts.architecture, "model_type": "gguf",
            "quantization": facts.quantization, "size_bytes": facts.size_bytes,
            "context_length_train": facts.context_train, "n_layer": facts.n_layer,
            "n_head": facts.n_head, "n_head_kv": facts.n_head_kv, "n_embd": facts.n_embd,
            "n_vocab": facts.n_vocab, "chat_template": facts.chat_template,
            "served_as": target.served_as, "loaded": target.loaded,
            "resolution_message": _resolution(target)},
        "runtime_plan": {
            "backend_id": "llama.cpp",
            "offload": "none" if knobs.offload.layers == 0 else knobs.offload.where,
            "supports_disk_cache": True, "supports_cpu_offload": knobs.offload.layers > 0,
            "supports_gpu_offload": knobs.offload.reason.startswith("CPU only") is False,
            "memory": mem,
            "reason": summary, "details": details},
    }


def _resolution(target: Target) -> str:
    if target.served_as:
        state = "loaded" if target.loaded else "not loaded yet"
        return f"served by this server as '{target.served_as}' ({state})"
    return f"a {target.source} reference resolved to {target.path}; not served by this server"
