"""What `lmserve serve` registers: the models it loads at start, then the library (models
directories and, when asked, the Hugging Face cache and Ollama's store), and the load
manager's limits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lmserve.models.library import (
    LibraryEntry,
    LibrarySettings,
    discover,
    inspect,
    projector_for,
    scan_dir,
    unique_names,
)
from lmserve.models.managed import DEFAULT_MAX_LOADED
from lmserve.models.registry import ModelRegistry
from lmserve.service import EngineSettings

log = logging.getLogger("lmserve.models")


@dataclass(frozen=True)
class StartModel:
    """A model named on the command line (or in the config file's model list)."""

    name: str
    path: str
    settings: EngineSettings
    aliases: tuple[str, ...] = ()
    keep_alive: float | None = None  # None: forever, as `lmserve serve A B` always did
    at_start: bool = True  # False: listed, loaded when a request asks for it
    defaults: Mapping[str, Any] = field(default_factory=dict)  # generation parameters


def fill(registry: ModelRegistry, start: Sequence[StartModel], library: LibrarySettings,
         engine: EngineSettings) -> list[LibraryEntry]:
    """Register the models and configure the registry's load manager; returns the library's
    entries (for the start-up line). Raises ValueError for settings that cannot hold."""
    manager = registry.manager
    manager.keep_alive = library.keep_alive
    manager.load_timeout = library.load_timeout
    manager.memory_budget = library.memory_budget
    manager.vram_budget = library.vram_budget
    at_start = sum(1 for m in start if m.at_start)
    if library.max_loaded is not None and library.max_loaded < at_start:
        raise ValueError(f"max_loaded {library.max_loaded} is less than the {at_start} models "
                         "loaded at start")
    manager.max_loaded = library.max_loaded or max(DEFAULT_MAX_LOADED, at_start)
    for model in start:
        entry = replace(inspect(model.name, model.path, "cli", aliases=model.aliases),
                        mmproj=projector_for(model.path))
        registry.add_managed(entry, model.settings, keep_alive=model.keep_alive,
                             at_start=model.at_start, defaults=model.defaults)
    found: list[LibraryEntry] = []
    for directory in library.models_dirs:
        found += scan_dir(directory)
    found += discover(library.discover)
    taken = {name for service in registry for name in registry.names(service)}
    entries = unique_names(found, taken)
    for entry in entries:
        settings = engine if entry.n_ctx is None or engine.n_ctx else \
            replace(engine, n_ctx=entry.n_ctx)
        registry.add_managed(entry, settings)
        if entry.error is not None:
            log.warning("model %s (%s) cannot be loaded: %s", entry.name, entry.path,
                        entry.error)
    return entries
