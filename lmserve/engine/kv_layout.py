"""How the KV cache is laid out: one stream of the whole context per slot, or one pool shared
by every slot. Pure rules plus the machine's memory size; service.py and /v1/plan both ask.

A stream per slot ("split") keeps each sequence's attention to its own cells: with one shared
pool every decode query walks the pool's whole used span, other sequences' cells included,
which costs 8 decoders 10-15% a step (docs/benchmarks.md, unified_span_cost.py). Split streams
cost memory: every slot (parallel + cache slots) holds a whole context of cells. "auto", the
default, splits when those streams fit in an eighth of the machine's memory and shares
otherwise, so a small model is fast by default and a large one does not take the machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.engine import hardware

LAYOUTS = ("auto", "split", "shared")
MEMORY_SHARE = 8  # auto splits when the split KV takes at most 1/MEMORY_SHARE of memory
F16_BYTES = 2  # llama.cpp's default K and V cache type (engine.hardware.KV_TYPES: the others)
GIB = 1 << 30


@dataclass(frozen=True)
class Layout:
    split: bool
    reason: str


# The defaults that size the KV cache. A context of at most 4096 cells a sequence (the model's
# own if smaller), as Ollama and llama-server default to; and a quarter as many idle cache slots
# (finished conversations kept for prefix reuse) as running ones: with a stream per slot, every
# slot costs a whole context of cells, so --parallel 8 with 8 cache slots held twice the KV of
# llama-server at the same context and parallelism (docs/benchmarks.md, the default's memory).
DEFAULT_CTX_CAP = 4096
FALLBACK_CTX = 4096  # a header that names no training context


def default_ctx(n_ctx_train: int | None) -> int:
    """The context of one sequence when --ctx is unset."""
    return min(n_ctx_train or FALLBACK_CTX, DEFAULT_CTX_CAP)


def default_cache_slots(parallel: int) -> int:
    """Idle slots kept for prefix reuse when --cache-slots is unset."""
    return max(1, parallel // 4)


def kv_bytes_per_token(n_layer: int, n_head_kv: int, key_length: int, value_length: int,
                       type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V rows of one cell, on every layer (f16 unless other KV types are given)."""
    return hardware.kv_bytes_per_token(n_layer, n_head_kv, key_length, value_length,
                                       type_k, type_v)


def bytes_per_token_from_metadata(metadata: Mapping[str, Any], type_k: str = "f16",
                                  type_v: str = "f16") -> int | None:
    """The same from a GGUF header's key-value pairs (values as numbers or as the strings
    llama.cpp's metadata API gives); None when the header does not say (e.g. per-layer
    head counts)."""
    shape = kv_shape_from_metadata(metadata)
    return None if shape is None else kv_bytes_per_token(*shape, type_k, type_v)


def kv_shape_from_metadata(metadata: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(n_layer, n_head_kv, key_length, value_length) from a GGUF header; None when it does
    not say them as single numbers."""
    arch = str(metadata.get("general.architecture", ""))

    def number(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return int(value)
        try:
            return int(str(value)) if value is not None else None
        except ValueError:
            return None

    n_layer, n_embd, n_head = number("block_count"), number("embedding_length"), \
        number("attention.head_count")
    if not n_layer or not n_embd or not n_head:
        return None
    widths = []
    for key, default in (("attention.head_count_kv", n_head),
                         ("attention.key_length", n_embd // n_head),
                         ("attention.value_length", n_embd // n_head)):
        if f"{arch}.{key}" in metadata and number(key) is None:
            return None  # present but not one number: per-layer values
        widths.append(number(key) or default)
    return n_layer, widths[0], widths[1], widths[2]


def choose(setting: str, *, bytes_per_token: int | None, n_ctx: int, n_slots: int,
           memory: int | None) -> Layout:
    """setting: auto | split | shared; memory: the machine's memory in bytes (None: unknown)."""
    if setting not in LAYOUTS:
        raise ValueError(f"kv_layout must be one of {', '.join(LAYOUTS)}, got {setting!r}")
    if setting == "split":
        return Layout(True, f"a KV stream of {n_ctx} cells per slot ({n_slots} slots), "
                            "as configured (--kv-layout split)")
    if setting == "shared":
        return Layout(False, f"one KV pool of {n_ctx} cells shared by all {n_slots} slots, "
                             "as configured (--kv-layout shared)")
    if bytes_per_token is None or memory is None:
        return Layout(False, f"one KV pool of {n_ctx} cells shared by all {n_slots} slots: "
                             "auto could not size a stream per slot (model shape or memory "
                             "unknown)")
    need = bytes_per_token * n_ctx * n_slots
    budget = memory // MEMORY_SHARE
    sizes = f"{n_slots} x {n_ctx} cells would take {need / GIB:.2f} GiB, " \
            f"{'within' if need <= budget else 'more than'} 1/{MEMORY_SHARE} of " \
            f"{memory / GIB:.1f} GiB memory"
    if need <= budget:
        return Layout(True, f"a KV stream of {n_ctx} cells per slot (auto: {sizes})")
    return Layout(False, f"one KV pool of {n_ctx} cells shared by all {n_slots} slots "
                         f"(auto: a stream per slot, {sizes})")


def fallback(n_ctx: int, n_slots: int, error: Exception) -> Layout:
    """What auto becomes when llama.cpp could not make the split context."""
    return Layout(False, f"one KV pool of {n_ctx} cells shared by all {n_slots} slots (auto: a "
                         f"stream per slot could not be made: {error})")


def machine_memory() -> int | None:
    """Physical memory in bytes, or the cgroup's limit when that is lower; None if unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        if total is None or 0 < limit < total:
            total = limit
        break
    return total
