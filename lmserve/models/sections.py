"""Per-model sections of the config file (`[models.NAME]` tables, or objects in a `models`
list): where the model is, its names, its engine settings, default generation parameters,
keep-alive and whether it loads at start or on demand. Like llama-server's model presets or
llama-swap's file. A key nobody knows is refused at start, by its dotted name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmserve.core.errors import LmserveError
from lmserve.core.lifecycle import keep_alive_seconds

# The section's own keys; the engine's keys (and their aliases) are checked by the caller.
OWN_KEYS = ("name", "path", "model", "source", "alias", "aliases", "params", "keep_alive",
            "load")
LOAD_WHEN = ("start", "demand")


@dataclass(frozen=True)
class ModelSection:
    name: str
    reference: str  # a GGUF path, a bundled name, hf://owner/repo/file.gguf
    aliases: tuple[str, ...] = ()
    engine: Mapping[str, Any] = field(default_factory=dict)  # engine keys, as written
    params: Mapping[str, Any] = field(default_factory=dict)  # default generation parameters
    keep_alive: float | None = None  # None: the server's (forever when loaded at start)
    at_start: bool = True


def parse_section(name: str, table: Mapping[str, Any], engine_keys: Callable[[str], bool]
                  ) -> ModelSection:
    """One model's table; `engine_keys(key)`: whether the engine settings know the key."""
    where = f"models.{name}"
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: expected a table")
    unknown = [k for k in table if k not in OWN_KEYS and not engine_keys(k)]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    reference = table.get("path") or table.get("model") or table.get("source")
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"{where}: needs path (a GGUF file), model (a bundled name or "
                         "hf://owner/repo/file.gguf) or source")
    aliases = table.get("aliases", [])
    if isinstance(aliases, str):
        aliases = [aliases]
    if table.get("alias"):
        aliases = [table["alias"], *aliases]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ValueError(f"{where}.aliases: expected a list of names")
    params = table.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}.params: expected a table of generation parameters")
    from lmserve.models.resource import check_params
    try:
        params = check_params(params, where=f"{where}.params")
    except LmserveError as exc:
        raise ValueError(f"{exc.param}: {exc.message}") from None
    try:
        keep_alive = keep_alive_seconds(table.get("keep_alive"), f"{where}.keep_alive")
    except LmserveError as exc:
        raise ValueError(exc.message) from None
    load = table.get("load", "start")
    if load not in LOAD_WHEN:
        raise ValueError(f"{where}.load: must be start or demand, got {load!r}")
    engine = {k: v for k, v in table.items() if k not in OWN_KEYS}
    return ModelSection(str(table.get("name") or name), reference, tuple(aliases), engine,
                        params, keep_alive, load == "start")
