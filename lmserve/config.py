"""Server configuration: defaults < config file (JSON or TOML) < LMSERVE_* environment < flags."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.chat.media import MEDIA_KEYS, media_policy
from lmserve.chat.overflow import OVERFLOW_POLICIES
from lmserve.engine.disk_cache import ByteSize
from lmserve.engine.kv_layout import LAYOUTS
from lmserve.core.lora import parse_specs
from lmserve.service import EngineSettings


class Flag(int):
    """A boolean setting from a flag, a config file or the environment ("true"/"1"/"yes")."""

    def __new__(cls, value: Any) -> "Flag":
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
    log_level: str = "info"
    store: str | None = None  # None: SQLite under data_dir; "memory"; "redis://host:port/db"
    data_dir: str | None = None
    stream_ttl: float = 600.0  # seconds a finished native stream stays readable
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Models of other OpenAI-compatible servers: (name, url, api_key, model), see lmserve.upstream
    upstreams: tuple[tuple[str, str, str | None, str | None], ...] = ()


# name -> (section in the file, type); engine keys live in EngineSettings.
_SERVER_KEYS = {"host": str, "port": int, "log_level": str, "store": str, "data_dir": str,
                "stream_ttl": float}
_ENGINE_KEYS = {"n_ctx": int, "parallel": int, "step_tokens": int, "threads": int,
                "threads_batch": int, "max_queue": int, "cache_slots": int, "cache_tokens": int,
                "lookup": int, "lookup_budget": int, "kv_layout": str,
                "embedding_ctx": int, "context_overflow": str,
                "disk_cache_dir": str, "disk_cache_max_bytes": ByteSize, "disk_cache_min_tokens": int}
# Aliases used by llama-cpp-python's config files (seed 003) and by our own flags.
_ALIASES = {"ctx": "n_ctx", "n_seq_max": "parallel", "n_batch": "step_tokens", "batch": "step_tokens",
            "n_threads": "threads", "n_threads_batch": "threads_batch"}


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
                              if isinstance(m, str) or "upstream" not in m]
            flat["upstreams"] = [_upstream_entry(str(m.get("name") or ""), m) for m in value
                                 if isinstance(m, dict) and "upstream" in m]
        elif key == "models" and isinstance(value, dict):  # [models.NAME] tables
            for name, entry in value.items():
                if not isinstance(entry, dict):
                    raise ValueError(f"models.{name}: expected a table")
                if "upstream" in entry:
                    flat.setdefault("upstreams", []).append(_upstream_entry(name, entry))
                else:
                    flat.setdefault("models", []).append(_model_entry({"name": name, **entry}))
        else:
            flat[key] = value
    if "path" in flat:  # seed 003 style: model.path (+ alias)
        ref = str(flat.pop("path"))
        alias = flat.pop("alias", None)
        flat.setdefault("models", []).append(f"{alias}={ref}" if alias else ref)
    return flat


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
    for key in [*_SERVER_KEYS, *_ENGINE_KEYS, "kv_split", *MEDIA_KEYS, "chat_template"]:
        value = env.get(f"LMSERVE_{key.upper()}")
        if value is not None:
            out[key] = value
    if env.get("LMSERVE_API_KEY"):
        out["api_keys"] = [k.strip() for k in env["LMSERVE_API_KEY"].split(",") if k.strip()]
    if env.get("LMSERVE_MODELS"):
        out["models"] = [m.strip() for m in env["LMSERVE_MODELS"].split(",") if m.strip()]
    return out


def build(*layers: dict[str, Any]) -> ServerConfig:
    """Merge layers (later wins; None values are skipped) into a validated ServerConfig."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None or (key in ("models", "api_keys", "upstreams") and not value):
                continue
            if key == "kv_split":  # the --kv-split flag: kv_layout split (or shared if false)
                key, value = "kv_layout", "split" if _coerce(key, value, Flag) else "shared"
            merged[_ALIASES.get(key, key)] = value
    server: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    media: dict[str, Any] = {}
    for key, value in merged.items():
        if key in _SERVER_KEYS:
            server[key] = _coerce(key, value, _SERVER_KEYS[key])
        elif key in _ENGINE_KEYS:
            engine[key] = _coerce(key, value, _ENGINE_KEYS[key])
        elif key == "chat_template":
            engine[key] = _template_source(str(value))
        elif key == "loras":
            engine[key] = parse_specs(value)
        elif key in MEDIA_KEYS:
            media[key] = value
        elif key in ("models", "api_keys"):
            server[key] = tuple(str(v) for v in value)
        elif key == "upstreams":
            server[key] = tuple(upstream_spec(v) for v in value)
            names = [u[0] for u in server[key]]
            if len(set(names)) != len(names):
                raise ValueError("two upstream models have the same name")
        else:
            raise ValueError(f"unknown configuration key {key!r}")
    for key in ("parallel", "step_tokens", "threads", "n_ctx", "max_queue",
                "disk_cache_max_bytes", "disk_cache_min_tokens"):
        if key in engine and engine[key] < 1:
            raise ValueError(f"{key} must be at least 1")
    if engine.get("context_overflow", "error") not in OVERFLOW_POLICIES:
        raise ValueError(f"context_overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
    if engine.get("kv_layout", "auto") not in LAYOUTS:
        raise ValueError(f"kv_layout must be one of {', '.join(LAYOUTS)}")
    engine["media"] = media_policy(media)
    return ServerConfig(**server, engine=dataclasses.replace(EngineSettings(), **engine))


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None


def _template_source(value: str) -> str:
    """A chat template override: a file path (.jinja, .j2, tokenizer_config.json) or inline."""
    from lmserve.chat.templates import load_template_file

    if "{%" in value or "{{" in value:
        return value
    return load_template_file(value)
