"""Server configuration: defaults < config file (JSON or TOML) < LMSERVE_* environment < flags."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.chat.media import MEDIA_ALIASES, MEDIA_KEYS, media_policy
from lmserve.chat.overflow import OVERFLOW_POLICIES
from lmserve.chat.response_schema import response_schema_text
from lmserve.core.errors import LmserveError
from lmserve.core.lora import LoraSpec, parse_specs
from lmserve.engine import hardware
from lmserve.engine.disk_cache import ByteSize
from lmserve.engine.draft_model import MTP_DRAFT
from lmserve.engine.kv_layout import LAYOUTS
from lmserve.models.library import LIBRARY_KEYS, LibrarySettings, library_settings
from lmserve.models.resolve import resolve
from lmserve.models.sections import ModelSection, parse_section
from lmserve.service import EngineSettings


def draft_path(reference: Any) -> str:
    """--draft: a model reference (a GGUF path, a bundled name, hf://...) as its file, or
    `mtp`: the model's own MTP / NextN layers (a file named mtp is ./mtp)."""
    if str(reference) == MTP_DRAFT:
        return MTP_DRAFT
    try:
        return resolve(str(reference)).path
    except LmserveError as exc:
        raise ValueError(exc.message) from None


def hub_path(reference: str, key: str) -> str:
    """hf://owner/repo/file.gguf[@revision] as its file in huggingface_hub's cache (fetched
    there unless HF_HUB_OFFLINE is set), as models.resolve fetches models; ValueError names
    the configuration key."""
    try:
        return resolve(reference).path
    except LmserveError as exc:
        raise ValueError(f"{key}: {exc.message}") from None


def pretrained_reference(value: Any, key: str) -> str:
    """Seed 003's `from_pretrained` table, {repo_id, filename, revision?}, as an hf://
    reference; ValueError names the key when its shape is wrong."""
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected a table {{repo_id, filename}}, got {value!r}")
    unknown = sorted(set(value) - {"repo_id", "filename", "revision"})
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {', '.join(unknown)} (it takes repo_id, "
                         "filename and revision)")
    repo_id, filename, revision = value.get("repo_id"), value.get("filename"), \
        value.get("revision")
    if not isinstance(repo_id, str) or len(repo_id.split("/")) != 2 or \
            not all(repo_id.split("/")):
        raise ValueError(f"{key}.repo_id: expected a Hugging Face repository, owner/name, got "
                         f"{repo_id!r}")
    if not isinstance(filename, str) or not filename.endswith(".gguf") or \
            filename.startswith("/") or any(c in filename for c in "*?["):
        raise ValueError(f"{key}.filename: expected the path of a .gguf file in the "
                         f"repository (no patterns), got {filename!r}")
    if revision is not None and (not isinstance(revision, str) or not revision or
                                 "@" in revision):
        raise ValueError(f"{key}.revision: expected a branch, tag or commit, got {revision!r}")
    return f"hf://{repo_id}/{filename}" + (f"@{revision}" if revision else "")


def projector_path(reference: Any) -> str:
    """--mmproj / mmproj_path: a projector GGUF's path as given, or hf://owner/repo/file.gguf
    (a Hugging Face projector, through huggingface_hub's cache)."""
    text = str(reference)
    if not text.startswith("hf://"):
        return text
    try:
        return resolve(text).path
    except LmserveError as exc:
        raise ValueError(exc.message) from None


class Flag(int):
    """A boolean setting from a flag, a config file or the environment ("true"/"1"/"yes")."""

    def __new__(cls, value: Any) -> Flag:
        if isinstance(value, str):
            text = value.strip().lower()
            if text not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                raise ValueError(value)
            value = text in ("true", "1", "yes", "on")
        elif not isinstance(value, (bool, int)):
            raise TypeError(value)
        return super().__new__(cls, bool(value))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # keys that may also use the admin routes
    api_key_file: str | None = None  # one key a line with its name and limits; SIGHUP rereads
    max_body_bytes: int = 32 * 1024 * 1024  # request bodies over this get 413
    max_prompt_tokens: int | None = None  # per request, for every caller
    max_output_tokens: int | None = None  # the most max_tokens of one request
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (CORS)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    log_level: str = "info"
    store: str | None = None  # None: SQLite under data_dir; "memory"; "redis://host:port/db"
    data_dir: str | None = None
    stream_ttl: float = 600.0  # seconds a finished native stream stays readable
    drain_timeout: float = 30.0  # seconds running requests may finish after SIGTERM
    log_format: str = "text"  # text | json (lmserve.http.observe)
    otel_endpoint: str | None = None  # OTLP/HTTP collector for traces; None: OTEL_* or off
    engine: EngineSettings = field(default_factory=EngineSettings)
    library: LibrarySettings = field(default_factory=LibrarySettings)  # models dirs, limits
    # [models.NAME] tables with settings of their own, and the engine settings each gets
    model_sections: tuple[tuple[ModelSection, EngineSettings], ...] = ()
    # Models of other OpenAI-compatible servers: (name, url, api_key, model), see lmserve.upstream
    upstreams: tuple[tuple[str, str, str | None, str | None], ...] = ()


# name -> (section in the file, type); engine keys live in EngineSettings.
_SERVER_KEYS = {"host": str, "port": int, "log_level": str, "store": str, "data_dir": str,
                "stream_ttl": float, "drain_timeout": float, "api_key_file": str,
                "max_body_bytes": ByteSize, "max_prompt_tokens": int, "max_output_tokens": int,
                "ssl_certfile": str, "ssl_keyfile": str, "log_format": str, "otel_endpoint": str}


@dataclass(frozen=True)
class Option:
    """One engine setting, declared once: the EngineSettings field, how text becomes its
    value, its command-line flags and help, and the other names files and the environment
    may use. The CLI, the config file keys and the LMSERVE_* variables all derive from it."""

    key: str  # the EngineSettings field; LMSERVE_<KEY> in the environment
    kind: Callable[[Any], Any]  # called on the text (flag, file, environment): the value
    flags: tuple[str, ...]  # command-line spellings
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    aliases: tuple[str, ...] = ()  # other key names (llama-cpp-python's config files, seed 003)
    const: Any = None  # a flag without a value that sets this (--no-mmap: False)
    flag_text: bool = False  # the flag keeps its text; build() converts it and says why not


ENGINE_OPTIONS: tuple[Option, ...] = (
    Option("parallel", int, ("--parallel", "-np"), "sequences decoded together (default 8)",
           minimum=1, aliases=("n_seq_max",)),
    Option("n_ctx", int, ("--ctx", "-c"),
           "context size: the longest prompt + output of one sequence, and the cells of each "
           "KV stream (see --kv-layout) (default: the model's, at most 4096)",
           minimum=1, aliases=("ctx",)),
    Option("threads", int, ("--threads", "-t"), "CPU threads for decoding (default: all cores)",
           minimum=1, aliases=("n_threads",)),
    Option("threads_batch", int, ("--threads-batch",), "CPU threads for prompt processing",
           aliases=("n_threads_batch",)),
    Option("step_tokens", int, ("--batch", "-b"),
           "token budget per engine step: decode tokens + prompt chunks (default 512)",
           minimum=1, aliases=("n_batch", "batch")),
    Option("mixed_prefill", int, ("--mixed-prefill",),
           "prompt tokens one step computes while other sequences decode, so a long prompt "
           "does not stall them (default 128; 0: the whole --batch budget)", metavar="N",
           minimum=0),
    Option("prefill_lane", int, ("--prefill-lane",),
           "threads that compute a long prompt in a side context while the others decode on "
           "the rest, so the prompt does not stall them (default: half the threads when the "
           "model runs on the CPU alone; 0: off)", metavar="N", minimum=0),
    Option("prefill_lane_min", int, ("--prefill-lane-min",),
           "prompt tokens still to compute that send a prompt to the prefill lane (default "
           "512)", metavar="N", minimum=1),
    Option("prefix_wait", int, ("--prefix-wait",),
           "a request whose prompt shares at least N more tokens with a prompt still being "
           "computed waits for it and copies the prefix (default 64; 0: never waits)",
           metavar="N", minimum=0),
    Option("max_queue", int, ("--max-queue",),
           "requests waiting beyond --parallel before 429 (default 256)", minimum=1),
    Option("max_queued_tokens", int, ("--max-queued-tokens",),
           "prompt tokens waiting for a slot before 429 (default: no limit)", metavar="N",
           minimum=1),
    Option("cache_slots", int, ("--cache-slots",),
           "finished sequences kept resident for prefix reuse, each a KV stream of --ctx "
           "cells when split (default: a quarter of --parallel, at least 1)"),
    Option("cache_tokens", int, ("--cache-tokens",),
           "idle KV tokens kept for prefix reuse besides the newest finished conversation "
           "(default: a quarter of --ctx in a shared pool, no limit with split streams)"),
    Option("session_kv_budget", int, ("--session-kv-budget",),
           "KV tokens kept pinned for open sessions (SGLang /open_session, oLLM "
           "/v1/sessions), all together, at most one --cache-slots slot each; 0: no pins "
           "(default: a quarter of --ctx in a shared pool, no limit with split streams)",
           metavar="N", minimum=0),
    Option("kv_layout", str, ("--kv-layout",),
           "KV cache layout: split gives every slot (--parallel + --cache-slots) its own "
           "stream of --ctx cells (fastest decoding of many sequences, the most memory); "
           "shared gives them one pool of --ctx cells; auto (the default) splits when that "
           "takes at most 1/8 of the memory", choices=LAYOUTS),
    Option("lookup", int, ("--lookup",),
           "prompt-lookup speculative decoding: most tokens drafted per sequence from its own "
           "context, verified in the batch (default 0: off; 8 is a good value)"),
    Option("lookup_budget", int, ("--lookup-budget",),
           "most drafted tokens verified per engine step (default 16)"),
    Option("mmproj", projector_path, ("--mmproj",),
           "multimodal (vision) projector GGUF for the model, a path or "
           "hf://owner/repo/file.gguf (default: the mmproj GGUF of the model file's folder "
           "that belongs to it: named after it, or alone with it)",
           metavar="PATH", aliases=("mmproj_path",), flag_text=True),
    Option("media_cache_bytes", int, ("--media-cache-bytes",),
           "memory for encoded images, reused when the same image comes again (default "
           "256 MiB)", minimum=0),
    Option("media_cache_dir", str, ("--media-cache-dir",),
           "keep encoded images on disk here too, so a restarted server does not encode them "
           "again (default: off)", metavar="DIR", aliases=("embedding_cache_path",)),
    Option("media_cache_disk_bytes", ByteSize, ("--media-cache-disk-bytes",),
           "most bytes of encoded images on disk, e.g. 500M or 2G (default 1G); least "
           "recently used go first", metavar="SIZE", minimum=1,
           aliases=("embedding_cache_max_bytes",)),
    Option("draft", draft_path, ("--draft",),
           "speculative decoding with a draft model: a smaller GGUF with the same vocabulary "
           "(a path, bundled name or hf://...) guesses tokens for every decoding sequence, "
           "verified in the batch like --lookup's; 'mtp': the model's own MTP / NextN "
           "layers guess them (default: none)", metavar="MODEL",
           aliases=("draft_model",)),
    Option("draft_max", int, ("--draft-max",),
           "most tokens the draft model guesses per sequence and step (default 8)",
           minimum=1),
    Option("response_schema", response_schema_text, ("--response-schema",),
           "parse the model's chat output with this JSON Schema (Hugging Face's x-regex "
           "response parsing) into content, reasoning and tool calls, in place of the "
           "built-in parsers: a JSON file, or inline JSON (default: none)", metavar="FILE",
           flag_text=True),
    Option("context_overflow", str, ("--context-overflow",),
           "a chat that does not fit the context: refuse it (error, the default) or drop its "
           "oldest turns after the system prompt (truncate); requests may choose for "
           "themselves", choices=OVERFLOW_POLICIES),
    Option("disk_cache_dir", str, ("--disk-cache",),
           "save the KV state of long prefixes here, so a restarted server does not recompute "
           "them (default: off)", metavar="DIR"),
    Option("disk_cache_max_bytes", ByteSize, ("--disk-cache-max-bytes",),
           "most bytes of saved states per model, e.g. 500M or 2G (default 4G); least "
           "recently used states go first", metavar="SIZE", minimum=1),
    Option("disk_cache_min_tokens", int, ("--disk-cache-min-tokens",),
           "shortest prefix saved or loaded (default 256)", metavar="N", minimum=1),
    Option("cache_ram_bytes", ByteSize, ("--cache-ram",),
           "keep the KV states of finished requests in RAM (a tmpfs under /dev/shm, up to SIZE "
           "per model, e.g. 8G) and load them back instead of recomputing a conversation whose "
           "KV was evicted, like llama-server's --cache-ram; least recently used go first "
           "(default: off)", metavar="SIZE", minimum=1),
    Option("cache_ram_min_tokens", int, ("--cache-ram-min-tokens",),
           "shortest prefix kept in or loaded from the RAM tier (default 64)", metavar="N",
           minimum=1),
    Option("embedding_ctx", int, ("--embedding-ctx",),
           "context of the embedding context (2048)"),
    Option("gpu_layers", hardware.gpu_layers, ("--gpu-layers", "-ngl"),
           "layers offloaded to the GPU: a number, all, or auto (the default: as many as fit "
           "90%% of the free VRAM, from the GGUF header; 0 on a CPU-only build)",
           metavar="N|all|auto", aliases=("n_gpu_layers",)),
    Option("split_mode", hardware.split_mode, ("--split-mode", "-sm"),
           "how several GPUs share the model: layer (default), row or none",
           choices=tuple(hardware.SPLIT_MODES)),
    Option("main_gpu", int, ("--main-gpu", "-mg"),
           "the GPU for the whole model with --split-mode none (default 0)", minimum=0),
    Option("tensor_split", hardware.tensor_split, ("--tensor-split", "-ts"),
           "the share of the model on each GPU, e.g. 3,1", metavar="A,B,..."),
    Option("rpc", hardware.rpc_servers, ("--rpc",),
           "offload layers to the devices of llama.cpp RPC servers on other hosts (`lmserve "
           "rpc-server`), before this host's GPUs: --gpu-layers says how many, --tensor-split "
           "their shares; experimental, unauthenticated: a private network only "
           "(docs/deploy.md) (default: none)", metavar="HOST:PORT,...",
           aliases=("rpc_servers",), flag_text=True),
    Option("flash_attn", hardware.flash_attn, ("--flash-attn", "-fa"),
           "flash attention: on, off or auto (default: llama.cpp decides per device)",
           choices=tuple(hardware.FLASH_ATTN)),
    Option("kv_offload", Flag, ("--no-kv-offload", "-nkvo"),
           "keep the KV cache (and attention) in RAM when layers are on the GPU",
           aliases=("offload_kqv",), const=False),
    Option("op_offload", Flag, ("--no-op-offload",),
           "do not offload host tensor operations to the GPU", const=False),
    Option("mlock", Flag, ("--mlock",), "lock the weights in RAM (no swapping)",
           aliases=("use_mlock",), const=True),
    Option("mmap", Flag, ("--no-mmap",), "read the weights into memory instead of mapping "
           "the file", aliases=("use_mmap",), const=False),
    Option("cache_type_k", hardware.kv_type, ("--cache-type-k", "-ctk"),
           "KV cache type of K: f16 (default), q8_0, q4_0, ... (q8_0 halves the KV memory)",
           choices=tuple(hardware.KV_TYPES), aliases=("type_k",)),
    Option("cache_type_v", hardware.kv_type, ("--cache-type-v", "-ctv"),
           "KV cache type of V: f16 (default), q8_0, ...; a quantized V needs flash attention",
           choices=tuple(hardware.KV_TYPES), aliases=("type_v",)),
)
_ENGINE_KEYS = {o.key: o.kind for o in ENGINE_OPTIONS}
_OPTIONS = {o.key: o for o in ENGINE_OPTIONS}
_ALIASES = {alias: o.key for o in ENGINE_OPTIONS for alias in o.aliases}


def load_file(path: str) -> dict[str, Any]:
    """Read a JSON or TOML file into flat settings: server.*, model.* and top-level keys."""
    text = Path(path).read_text(encoding="utf-8")
    data = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the configuration must be an object")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("server", "model") and isinstance(value, dict):
            flat.update(value)
        elif key == "models" and isinstance(value, list):
            flat["models"] = [m if isinstance(m, str) else _model_entry(m) for m in value
                              if isinstance(m, str) or set(m) <= _PLAIN_MODEL_KEYS]
            flat["model_sections"] = [
                _section_mtmd(str(m.get("name") or m.get("alias") or "?"), m) for m in value
                if isinstance(m, dict) and "upstream" not in m
                and not set(m) <= _PLAIN_MODEL_KEYS]
            flat["upstreams"] = [_upstream_entry(str(m.get("name") or ""), m) for m in value
                                 if isinstance(m, dict) and "upstream" in m]
        elif key == "models" and isinstance(value, dict):  # [models.NAME] tables
            for name, entry in value.items():
                if not isinstance(entry, dict):
                    raise ValueError(f"models.{name}: expected a table")
                if "upstream" in entry:
                    flat.setdefault("upstreams", []).append(_upstream_entry(name, entry))
                elif set(entry) <= _PLAIN_MODEL_KEYS:
                    flat.setdefault("models", []).append(_model_entry({"name": name, **entry}))
                else:  # a model with settings of its own (lmserve.models.sections)
                    flat.setdefault("model_sections", []).append(
                        {"name": name, **_section_mtmd(name, entry)})
        else:
            flat[key] = value
    if "mtmd" in flat:  # seed 003's model.mtmd table
        flat.update(_mtmd_keys(flat.pop("mtmd"), "mtmd"))
    if "path" in flat:  # seed 003 style: model.path (+ alias)
        ref = str(flat.pop("path"))
        alias = flat.pop("alias", None)
        flat.setdefault("models", []).append(f"{alias}={ref}" if alias else ref)
    return flat


_PLAIN_MODEL_KEYS = {"name", "path", "model", "alias"}  # a model entry without settings


# seed 003's `mtmd` table: the projector (a file, or a Hugging Face one), the embedding cache's
# disk tier and the media policy (audio_max_bytes is known when audio input is)
MTMD_KEYS = ("mmproj_path", "mmproj_from_pretrained", "embedding_cache", "image_max_bytes",
             "audio_max_bytes", "image_timeout_seconds", "allowed_media_domains",
             "allowed_local_media_path")


def _mtmd_keys(table: Any, where: str) -> dict[str, Any]:
    """Seed 003's `mtmd` table as flat keys: embedding_cache.path and .max_bytes become
    embedding_cache_path and embedding_cache_max_bytes (the disk tier); the rest as named
    (build() reads them). A key it does not take is refused by its dotted name."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = sorted(set(table) - set(MTMD_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (it takes "
                         f"{', '.join(MTMD_KEYS)})")
    if "mmproj_path" in table and "mmproj_from_pretrained" in table:
        raise ValueError(f"{where}: mmproj_path and mmproj_from_pretrained both name the "
                         "projector; give one")
    flat = {k: v for k, v in table.items() if k != "embedding_cache"}
    cache = table.get("embedding_cache") or {}
    if not isinstance(cache, dict) or set(cache) - {"path", "max_bytes"}:
        raise ValueError(f"{where}.embedding_cache takes path and max_bytes")
    flat.update({f"embedding_cache_{k}": v for k, v in cache.items()})
    return flat


def _section_mtmd(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A model section with its `mtmd` table read as flat keys."""
    if "mtmd" not in entry:
        return entry
    return {**{k: v for k, v in entry.items() if k != "mtmd"},
            **_mtmd_keys(entry["mtmd"], f"models.{name}.mtmd")}


def _model_section(entry: dict[str, Any], base: EngineSettings
                   ) -> tuple[ModelSection, EngineSettings]:
    """A model's own section, and its engine settings: the server's, with the section's."""
    name = str(entry.get("name") or entry.get("alias") or "?")
    section = parse_section(name, entry, lambda k: _ALIASES.get(k, k) in _ENGINE_KEYS or
                            k in ("chat_template", "loras", "mmproj_from_pretrained") or
                            k in MEDIA_KEYS)
    media = {k: v for k, v in section.engine.items() if k in MEDIA_KEYS}
    try:
        own = build(dict(section.engine)).engine
        # the media policy: the server's, with what the section sets
        policy = media_policy(media, base.media) if media else base.media
    except ValueError as exc:
        raise ValueError(f"models.{name}: {exc}") from None
    fields = {_SPELLED.get(k) or _ALIASES.get(k, k) for k in section.engine
              if k not in MEDIA_KEYS}
    return section, dataclasses.replace(base, media=policy,
                                        **{f: getattr(own, f) for f in fields})


def _model_entry(entry: dict[str, Any]) -> str:
    ref = str(entry.get("path") or entry.get("model") or "")
    name = entry.get("name") or entry.get("alias")
    return f"{name}={ref}" if name else ref


def _upstream_entry(name: str, entry: dict[str, Any]) -> tuple[str, str, Any, Any]:
    """`upstream = "URL"` or `upstream = {url = "...", api_key = "...", model = "..."}`."""
    where = f"models.{name or '?'}.upstream"
    value = entry["upstream"]
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise ValueError(f"{where}: expected a URL or {{url, api_key, model}}")
    unknown = set(value) - {"url", "api_key", "model"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return (name, value["url"], value.get("api_key"), value.get("model"))


def upstream_spec(value: Any) -> tuple[str, str, str | None, str | None]:
    """A --upstream NAME=URL flag, or an entry as load_file() makes it."""
    if isinstance(value, str):
        name, sep, url = value.partition("=")
        if not sep:
            raise ValueError(f"--upstream {value!r}: expected NAME=URL")
        value = (name, url, None, None)
    name, url, api_key, model = (tuple(value) + (None, None))[:4]
    name, url = str(name).strip(), str(url).strip()
    if not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"upstream {name or '?'}: needs a name and an http(s) URL, "
                         f"got {url!r}")
    return (name, url, None if api_key is None else str(api_key),
            None if model is None else str(model))


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key in [*_SERVER_KEYS, *_ENGINE_KEYS, "kv_split", *MEDIA_KEYS, *LIBRARY_KEYS,
                "chat_template"]:
        value = env.get(f"LMSERVE_{key.upper()}")
        if value is not None:
            out[key] = value
    if env.get("LMSERVE_API_KEY"):
        out["api_keys"] = [k.strip() for k in env["LMSERVE_API_KEY"].split(",") if k.strip()]
    for key, var in (("admin_keys", "LMSERVE_ADMIN_KEY"), ("cors_origins", "LMSERVE_CORS_ORIGIN")):
        if env.get(var):
            out[key] = [k.strip() for k in env[var].split(",") if k.strip()]
    if env.get("LMSERVE_MODELS"):
        out["models"] = [m.strip() for m in env["LMSERVE_MODELS"].split(",") if m.strip()]
    return out


_LISTS = ("models", "api_keys", "admin_keys", "cors_origins", "upstreams")
# One setting under several names (seed 003's among them): a layer gives it once, and a later
# layer's name replaces an earlier one's. key -> the setting (for mmproj: its field)
_SPELLED = {"mmproj": "mmproj", "mmproj_path": "mmproj", "mmproj_from_pretrained": "mmproj",
            **{k: MEDIA_ALIASES.get(k, k) for k in MEDIA_KEYS}}
_POSITIVE = ("max_body_bytes", "max_prompt_tokens", "max_output_tokens")


def build(*layers: dict[str, Any]) -> ServerConfig:
    """Merge layers (later wins; None values are skipped) into a validated ServerConfig."""
    merged: dict[str, Any] = {}
    for layer in layers:
        named: dict[str, str] = {}  # a setting of _SPELLED -> the name this layer gave it by
        for key, value in layer.items():
            if value is None or (key in _LISTS and not value):
                continue
            if key == "kv_split":  # the --kv-split flag: kv_layout split (or shared if false)
                key, value = "kv_layout", "split" if _coerce(key, value, Flag) else "shared"
            setting = _SPELLED.get(key)
            if setting is not None:
                if setting in named and named[setting] != key:
                    raise ValueError(f"{named[setting]} and {key} are one setting; give one")
                named[setting] = key
                for other, same in _SPELLED.items():  # an earlier layer's, by any name
                    if same == setting:
                        merged.pop(other, None)
                if key == "mmproj_from_pretrained":
                    merged[key] = value
                    continue
            merged[_ALIASES.get(key, key)] = value
    server: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    media: dict[str, Any] = {}
    library: dict[str, Any] = {}
    sections: list[dict[str, Any]] = []
    for key, value in merged.items():
        if key in _SERVER_KEYS:
            server[key] = _coerce(key, value, _SERVER_KEYS[key])
        elif key in _ENGINE_KEYS:
            engine[key] = _coerce(key, value, _ENGINE_KEYS[key])
        elif key == "chat_template":  # a string, or its lines as a list of strings (seed 003)
            engine[key] = _template_source("\n".join(map(str, value)) if isinstance(value, list)
                                           else str(value))
        elif key == "mmproj_from_pretrained":  # {repo_id, filename}: the file in HF's cache
            engine["mmproj"] = _coerce(key, pretrained_reference(value, key), projector_path)
        elif key == "loras":
            engine[key] = _lora_specs(value)
        elif key in LIBRARY_KEYS:
            library[key] = value
        elif key == "model_sections":
            sections = list(value)
        elif key in MEDIA_KEYS:
            media[key] = value
        elif key in ("models", "api_keys", "admin_keys", "cors_origins"):
            if isinstance(value, str):  # a single value in a config file
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{key} must be a list of strings, got {value!r}")
            server[key] = tuple(str(v) for v in value)
        elif key == "upstreams":
            server[key] = tuple(upstream_spec(v) for v in value)
            names = [u[0] for u in server[key]]
            if len(set(names)) != len(names):
                raise ValueError("two upstream models have the same name")
        else:
            raise ValueError(f"unknown configuration key {key!r}")
    for key, value in engine.items():
        option = _OPTIONS.get(key)
        if option is None:
            continue
        if option.minimum is not None and value < option.minimum:
            raise ValueError(f"{key} must be at least {option.minimum}")
        if option.choices is not None and value not in option.choices:
            raise ValueError(f"{key} must be one of {', '.join(option.choices)}")
    if not 0 <= server.get("port", 0) <= 65535:  # uvicorn would bind port % 65536
        raise ValueError(f"port must be 0-65535, got {server['port']}")
    if server.get("log_format", "text") not in ("text", "json"):
        raise ValueError("log_format must be text or json")
    if server.get("drain_timeout", 0.0) < 0:
        raise ValueError("drain_timeout must be 0 or more seconds")
    for key in _POSITIVE:
        if server.get(key) is not None and server[key] < 1:
            raise ValueError(f"{key} must be at least 1")
    if server.get("ssl_keyfile") and not server.get("ssl_certfile"):
        raise ValueError("ssl_keyfile needs ssl_certfile (the certificate) too")
    for key in ("ssl_certfile", "ssl_keyfile", "api_key_file"):
        if server.get(key) and not os.path.isfile(server[key]):
            raise ValueError(f"{key}: no such file: {server[key]}")
    engine["media"] = media_policy(media)
    settings = dataclasses.replace(EngineSettings(), **engine)
    # A quantized V cache without flash attention: llama.cpp would refuse it at load.
    hardware.check_kv_types(settings.cache_type_k, settings.cache_type_v, settings.flash_attn)
    return ServerConfig(**server, engine=settings, library=library_settings(library),
                        model_sections=tuple(_model_section(e, settings) for e in sections))


def _lora_specs(value: Any) -> tuple[LoraSpec, ...]:
    """The `loras` setting, with seed 003's `from_pretrained` {repo_id, filename} entries and
    hf://owner/repo/file.gguf paths (--lora ALIAS=hf://...) as files in HF's cache."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, item in enumerate(items):
        if isinstance(item, dict) and "from_pretrained" in item:
            where = f"loras[{i}].from_pretrained"
            if item.get("path"):
                raise ValueError(f"loras[{i}]: path and from_pretrained both name the "
                                 "adapter; give one")
            reference = pretrained_reference(item["from_pretrained"], where)
            items[i] = {**{k: v for k, v in item.items() if k != "from_pretrained"},
                        "path": hub_path(reference, where)}
    specs = parse_specs(items)
    return tuple(dataclasses.replace(s, path=hub_path(s.path, f"LoRA '{s.alias}'"))
                 if s.path.startswith("hf://") else s for s in specs)


def _coerce(key: str, value: Any, kind: Callable[[Any], Any]) -> Any:
    if isinstance(value, bool) and kind in (int, float) or (  # int(True) would quietly be 1,
            kind is int and isinstance(value, float) and not value.is_integer()):  # int(1.5) 1
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        if isinstance(kind, type):  # int, float, Flag, ByteSize: say the type
            raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None
        raise ValueError(f"{key}: {exc}") from None  # a parser (engine.hardware) says why


def _template_source(value: str) -> str:
    """A chat template override: a file path (.jinja, .j2, tokenizer_config.json) or inline."""
    from lmserve.chat.templates import load_template_file

    if "{%" in value or "{{" in value:
        return value
    return load_template_file(value)
