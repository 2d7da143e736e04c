"""The served models: lookup by name or alias, loading after the port is bound."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from lmserve.core import observe
from lmserve.core.backend import LoadState, ModelBackend
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.engine.hardware import Device
from lmserve.models.library import LibraryEntry, projector_for
from lmserve.models.managed import LoadManager, ManagedModel
from lmserve.models.views import NameView, engine_differences, same_prompting
from lmserve.service import EngineSettings, ModelService, gpu_facts

if TYPE_CHECKING:
    from tqdm import tqdm  # imported when a bar is shown (a terminal), see _Progress

log = logging.getLogger("lmserve.models")


class ModelRegistry:
    def __init__(self, manager: LoadManager | None = None) -> None:
        self.manager = manager or LoadManager()  # loads and unloads the managed models
        self._services: list[ModelBackend] = []
        self._by_key: dict[str, ModelBackend] = {}
        self._by_path: dict[str, ModelBackend] = {}
        self._engines: dict[str, list[ModelService | ManagedModel]] = {}  # a file's engines
        self.draining = False  # drain() was called: the server is shutting down

    def add(self, name: str, path: str, settings: EngineSettings,
            aliases: Iterable[str] = ()) -> ModelBackend:
        """Register a model. Names of one file share one loaded engine when their engine
        settings are equal: an alias with the same per-name settings, else a view with its
        own (models.views); different engine settings get an engine of their own."""
        engines = self._engines.setdefault(path, [])
        for service in engines:
            if isinstance(service, ModelService) and \
                    not engine_differences(service.settings, settings):
                if same_prompting(service.settings, settings):
                    return self.add_backend(service, name, path, aliases)
                view = NameView(service, name, tuple(aliases), settings)
                return self.add_backend(view, name, f"{path}#{name}", aliases)
        service = ModelService(name, path, settings, aliases=tuple(aliases))
        service.found_mmproj = projector_for(path)
        engines.append(service)
        return self.add_backend(service, name, f"{path}#{name}" if len(engines) > 1 else path,
                                aliases)

    def add_managed(self, entry: LibraryEntry, settings: EngineSettings, *,
                    keep_alive: float | None = None, at_start: bool = False,
                    defaults: Mapping[str, Any] | None = None) -> ModelBackend:
        """Register a model the load manager loads (at start, or when a request asks for it)
        and unloads when idle. A file already registered: a name from the command line or
        the config file shares the engine whose engine settings equal its own (as an alias,
        or a view when its chat template, response schema, defaults or system prompt
        differ), or gets an engine of its own; a name the library found joins the file's
        first engine (a view only for an Ollama model's own defaults or system prompt)."""
        engines = self._engines.setdefault(entry.key, [])
        found = entry.source not in ("cli", "config")  # the library's
        defaults = {**entry.defaults, **(defaults or {})}
        for existing in engines:
            if not isinstance(existing, ManagedModel) or \
                    (not found and engine_differences(existing.settings, settings)):
                continue
            if entry.mmproj and not existing.entry.mmproj:
                existing.attach_projector(entry.mmproj)  # found for another name of the file
            if found:
                if not entry.defaults and not entry.system:
                    return self.add_backend(existing, entry.name, entry.key, entry.aliases)
                settings = existing.settings
            elif (keep_alive, at_start) != (existing.keep_alive, existing.at_start):
                raise ValueError(
                    f"models {existing.name!r} and {entry.name!r} share one loaded engine "
                    f"({entry.path}, the same engine settings) but ask for a different "
                    "keep_alive or load; give them the same, or make one an alias of the other")
            if same_prompting(existing.settings, settings) and \
                    defaults == dict(existing.defaults) and entry.system == existing.entry.system:
                return self.add_backend(existing, entry.name, entry.key, entry.aliases)
            view = NameView(existing, entry.name, entry.aliases, settings, defaults=defaults,
                            system=entry.system)
            return self.add_backend(view, entry.name, f"{entry.key}#{entry.name}", entry.aliases)
        model = ManagedModel(entry, settings, self.manager, keep_alive=keep_alive,
                             at_start=at_start, defaults=defaults)
        self.manager.add(model)
        if engines:
            log.info("model %s: its own engine of %s (engine settings differ from %s's: %s)",
                     entry.name, entry.path, engines[0].name,
                     ", ".join(engine_differences(engines[0].settings, settings)))
        engines.append(model)
        return self.add_backend(model, entry.name,
                                f"{entry.key}#{entry.name}" if len(engines) > 1 else entry.key,
                                entry.aliases)

    def managed(self, name: str) -> ManagedModel:
        """The managed model of a name (admin routes); else MODEL_NOT_FOUND."""
        service = self.get(name)
        if isinstance(service, NameView):  # a name with its own prompting: its engine's
            service = service.base
        if not isinstance(service, ManagedModel):
            raise LmserveError(ErrorKind.INVALID_REQUEST, f"the model '{name}' is not loaded "
                               "and unloaded by this server (an upstream, or an app's model)",
                               param="model", code="model_not_managed")
        return service

    def add_backend(self, service: ModelBackend, name: str | None = None, key: str | None = None,
                    aliases: Iterable[str] = ()) -> ModelBackend:
        """Register a backend under its name and aliases (`key`: its source; a source given
        twice keeps the backend registered first)."""
        labels = (name or service.name, *(tuple(aliases) or service.aliases))
        key = key or service.card.source
        if key not in self._by_path:
            self._services.append(service)
            self._by_path[key] = service
        service = self._by_path[key]
        for label in labels:
            owner = self._by_key.get(label)
            if owner is not None and owner is not service:
                raise ValueError(f"model name {label!r} is already taken by {owner.card.source}")
            self._by_key[label] = service
        return service

    def __iter__(self) -> Iterator[ModelBackend]:
        return iter(self._services)

    def __len__(self) -> int:
        return len(self._services)

    @staticmethod
    def gpu() -> tuple[bool, list[Device]]:
        """Whether this llama.cpp build has a GPU backend, and the GPUs it sees now (with
        their free memory): what /v1/plan sizes offload against."""
        return gpu_facts()

    def names(self, service: ModelBackend) -> list[str]:
        return [k for k, s in self._by_key.items() if s is service]

    def engine_names(self, service: ModelBackend) -> list[str]:
        """Every name a loaded engine serves: its own, and its views' (models.views)."""
        return [k for k, s in self._by_key.items()
                if s is service or (isinstance(s, NameView) and s.base is service)]

    def get(self, name: str | None) -> ModelBackend:
        if name is None or name == "":
            if len(self._services) == 1:
                observe.note_model(self._services[0].name)
                return self._services[0]
            raise LmserveError(ErrorKind.INVALID_REQUEST, "the 'model' field is required",
                               param="model", code="missing_required_parameter")
        service = self._by_key.get(name) or self._adapter_model(name)
        if service is None:
            adapters = [n for s in self._services for n in self.adapter_names(s)]
            known = ", ".join(sorted([*self._by_key, *adapters])) or "none"
            raise LmserveError(ErrorKind.MODEL_NOT_FOUND,
                               f"the model '{name}' does not exist on this server "
                               f"(served: {known})",
                               param="model", code="model_not_found")
        observe.note_model(service.name)
        return service

    def _adapter_model(self, name: str) -> ModelBackend | None:
        """"<model>:<alias>": a served model under one of its LoRA adapters."""
        base, _, alias = name.rpartition(":")
        service = self._by_key.get(base)
        if service is not None and any(s.alias == alias for s in service.card.loras):
            return service
        return None

    @staticmethod
    def adapter_names(service: ModelBackend) -> list[str]:
        """The model names of a service's LoRA adapters, "<model>:<alias>"."""
        return [f"{service.name}:{spec.alias}" for spec in service.card.loras]

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self._services)

    @property
    def status(self) -> str:
        if any(not s.healthy for s in self._services):
            return "error"
        return "ok" if self.ready else "loading"

    def load_in_background(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        """Load every model in a thread so the server answers (503 + Retry-After) meanwhile."""
        thread = threading.Thread(target=self._load_all, args=(loop,), name="lmserve-loader",
                                  daemon=True)
        thread.start()
        return thread

    def _load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        for service in self._services:
            if isinstance(service, NameView) or service.card.state != LoadState.PENDING or \
                    (isinstance(service, ManagedModel) and not service.at_start):
                continue  # library models load when a request asks for them; a view's engine
                #           loads under its first name
            with _Progress(service.name) as progress:
                try:
                    service.load(loop, progress.update)
                except Exception:
                    continue
            card = service.card
            log.info("model %s ready (%s, ctx %d, %d parallel)", card.name, card.source,
                     card.n_ctx, card.parallel)

    # -- shutdown ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Every backend refuses new generations from now on (503 draining)."""
        self.draining = True
        for service in self._services:
            service.drain()

    @property
    def busy(self) -> int:
        """Generations running or queued across every backend."""
        return sum(service.busy for service in self._services)

    async def fail_all(self, error: LmserveError) -> None:
        """End every backend's running and queued generations with this error."""
        for service in self._services:
            await service.fail_all(error)

    def close(self) -> None:
        for service in self._services:
            service.close()


class _Progress:
    """A progress bar on a terminal, a few log lines otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: tqdm[NoReturn] | None = None  # a bar over no iterable, only update()
        self.last_logged = -1

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=100, desc=f"loading {self.name}", unit="%", leave=True)
        else:
            log.info("loading model %s", self.name)
        return self

    def update(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if self.bar is not None:
            self.bar.update(percent - self.bar.n)
        elif percent // 25 > self.last_logged:
            self.last_logged = percent // 25
            log.info("loading %s: %d%%", self.name, percent)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
