"""Models that load when asked for and unload when idle.

`ManagedModel` is a llama.cpp model of the library (or given on the command line) behind the
backend contract: while it is not loaded, a request for it starts its load and raises
`core.lifecycle.ModelLoading`, which the dialect route awaits before it runs again, so every
request that arrives during a load waits for that one load. `LoadManager` decides whether a
load fits `--max-loaded`, `--memory-budget` (the models' RAM) and `--vram-budget` (their GPU
memory), evicting the least recently used idle model first (never one with a request
running or queued), and unloads each model when its keep-alive has passed since its last
request ended.

Everything here runs on the event loop except the load and the unload, which run in a
worker thread while the model is marked loading or unloading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from lmserve.core.backend import (
    BackendGeneration,
    CacheFlush,
    ChoiceStep,
    EngineStats,
    LoadState,
    ModelCard,
    PreparedPrompt,
    WeightsFacts,
    WrappedGeneration,
)
from lmserve.core.errors import ErrorKind, LmserveError, draining_error
from lmserve.core.lifecycle import FOREVER, ModelLoading, load_failed
from lmserve.core.lora import AdapterSet, LoraSelection
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.engine import hardware, kv_layout
from lmserve.models.library import (
    LibraryEntry,
    MemoryEstimate,
    MemoryNeed,
    context_of,
    inspect,
    memory_estimate,
)
from lmserve.prompting import Prompter
from lmserve.service import EngineSettings, ModelService, gpu_facts, prefill_lane_threads

log = logging.getLogger("lmserve.models")

DEFAULT_KEEP_ALIVE = 300.0  # --keep-alive: 5 minutes, as Ollama
DEFAULT_LOAD_TIMEOUT = 600.0  # --load-timeout: how long a request waits for its model's load
DEFAULT_MAX_LOADED = 3  # --max-loaded, unless more models are loaded at start


class ManagedModel:
    """A llama.cpp model that the LoadManager loads and unloads (see the module docstring).
    Implements the backend contract by handing each call to its ModelService once loaded."""

    kind = "llama.cpp"

    def __init__(self, entry: LibraryEntry, settings: EngineSettings, manager: LoadManager, *,
                 keep_alive: float | None = None, at_start: bool = False,
                 defaults: Mapping[str, Any] | None = None) -> None:
        self.entry = entry
        self.defaults = {**entry.defaults, **(defaults or {})}  # default generation params
        self.name = entry.name
        self.aliases = entry.aliases
        self.settings = settings
        self.service = ModelService(entry.name, entry.path, settings, aliases=entry.aliases)
        self.service.found_mmproj = entry.mmproj
        self.manager = manager
        self.keep_alive = keep_alive  # seconds after the last request; < 0: never; None: default
        self.at_start = at_start  # loaded when the server starts
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # wall clock; None: not loaded, busy, or never
        self.admitted = False  # counts against the limits: loading, loaded or unloading
        self.load_task: asyncio.Task[None] | None = None
        self.unloading: asyncio.Future[None] | None = None
        self._next_keep_alive: float | None = None  # the latest request's keep_alive
        self._generations: set[_Tracked] = set()
        self._embeddings = 0
        self._timer: asyncio.TimerHandle | None = None
        self.draining = False
        # per entry: the header's estimate, and the placement a load would get
        self._estimate: tuple[LibraryEntry, MemoryEstimate, hardware.Offload] | None = None

    # -- state ------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.service.state == "ready" and self.unloading is None

    @property
    def loading(self) -> bool:
        return self.load_task is not None and not self.load_task.done()

    @property
    def busy(self) -> int:
        """Requests started and not done: generations (running, queued or being read) and
        embeddings. A busy model is never unloaded."""
        self._generations = {g for g in self._generations if not g.done}
        return len(self._generations) + self._embeddings + self.service.busy

    def keep_alive_seconds(self) -> float:
        if self._next_keep_alive is not None:
            return self._next_keep_alive
        if self.keep_alive is not None:
            return self.keep_alive
        return FOREVER if self.at_start else self.manager.keep_alive

    def estimate(self, *, fresh: bool = False) -> MemoryNeed:
        """RAM and VRAM this model takes once loaded: its header's estimate (as /v1/plan's)
        split by its placement, the layers a load offloads (engine.hardware.offload, as
        --gpu-layers decides them) or, once loaded, the layers it did. Made once per entry
        (the card reads it on every request); `fresh` asks the GPUs' free memory again (what
        --gpu-layers auto weighs) before a load."""
        if fresh or self._estimate is None or self._estimate[0] is not self.entry:
            self._estimate = (self.entry, *self._estimated())
        _, estimate, offload = self._estimate
        if self.service.model is not None:  # loaded: where its layers went
            offload = self.service.offload
        return estimate.split(offload)

    def _estimated(self) -> tuple[MemoryEstimate, hardware.Offload]:
        s = self.settings
        slots = s.parallel + (s.cache_slots if s.cache_slots is not None
                              else kv_layout.default_cache_slots(s.parallel))
        def estimate_with(lane: bool) -> MemoryEstimate:
            return memory_estimate(self.entry.header, self.entry.size_bytes,
                                   n_ctx=context_of(self.entry.header, s.n_ctx), n_slots=slots,
                                   kv_setting=s.kv_layout,
                                   step_tokens=max(s.step_tokens, s.parallel),
                                   cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v,
                                   lane=lane)

        estimate = estimate_with(False)
        build, devices = gpu_facts() if s.gpu_layers != "0" else (False, [])
        offload = hardware.offload(s.gpu_layers, n_layer=estimate.n_layer,
                                   size_bytes=estimate.weights, kv_bytes=estimate.kv,
                                   kv_offload=s.kv_offload, devices=devices, gpu_build=build)
        if prefill_lane_threads(s, on_gpu=offload.layers > 0, drafting=bool(s.draft)):
            estimate = estimate_with(True)  # the lane's side context: one sequence more
        return estimate, offload

    # -- the card ---------------------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        card = self.service.card
        extra: dict[str, Any] = {"memory_bytes": self.estimate().total,
                                 "defaults": self.defaults,
                                 "expires_at": self.expires_at if self.loaded else None}
        if self.entry.error is not None:
            extra.update(state=LoadState.FAILED, error=self.entry.error)
        elif self.unloading is not None:
            extra.update(state=LoadState.READY)  # still resident until the unload ends
        elif card.state == LoadState.PENDING and self.loading:
            extra.update(state=LoadState.LOADING)  # waiting for room, then loading
        if card.weights is None:  # not loaded: what the header says
            header = self.entry.header
            extra["weights"] = WeightsFacts(
                architecture=header.architecture if header else None,
                n_ctx_train=header.context_length if header else None,
                size_bytes=self.entry.size_bytes,
                metadata={k: str(v) for k, v in header.metadata.items()} if header else {})
            extra["n_ctx"] = context_of(header, self.settings.n_ctx)
            template = self.settings.chat_template or (header.chat_template if header else None)
            if template is not None:
                extra["chat_template"] = template
        return replace(card, created=int(self.entry.modified) or card.created, **extra)

    @property
    def ready(self) -> bool:
        """Ready to take requests without a wait (a library model that is not loaded is
        ready to be asked for: it loads on demand, so health does not wait for it)."""
        return self.loaded or not self.at_start

    @property
    def healthy(self) -> bool:
        """A model loaded at start must load; a library model that cannot leaves the server
        healthy (its requests get the reason)."""
        if self.at_start and self.entry.error is not None:
            return False
        return self.service.healthy if self.at_start or self.loaded else True

    def stats(self) -> EngineStats | None:
        return self.service.stats() if self.loaded else None

    # -- lifecycle (the registry's) ---------------------------------------------------------
    def load(self, loop: asyncio.AbstractEventLoop,
             progress: Callable[[float], None] | None = None) -> None:
        """Blocking (the start-up loader thread): load now, through the manager like a load
        on demand, so requests that arrive meanwhile wait for this load."""
        if self.entry.error is not None:
            raise RuntimeError(self.entry.error)

        async def run() -> None:
            await self.manager.request_load(self, progress)

        try:
            asyncio.run_coroutine_threadsafe(run(), loop).result()
        except LmserveError as exc:  # refused before llama.cpp saw it (the memory budget)
            if self.service.state != "failed":
                self.service.state, self.service.error = "failed", exc.message
            raise

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.service.close()

    def drain(self) -> None:
        self.draining = True  # no loads any more: the server is shutting down
        self.service.drain()

    async def fail_all(self, error: LmserveError) -> None:
        await self.service.fail_all(error)

    # -- using the model --------------------------------------------------------------------
    def _loaded(self) -> ModelService:
        """The service once loaded; otherwise start (or join) its load and raise
        ModelLoading, which the route awaits."""
        if self.entry.error is not None:
            raise load_failed(self.name, self.entry.error)
        if self.loaded:
            if self.service.client is not None and not self.service.client.alive:
                self.service.require_ready()  # the engine stopped: its error
            self.last_used = time.monotonic()
            return self.service
        if self.service.state == "failed" and not self.loading:
            raise load_failed(self.name, self.service.error or "unknown error")
        if self.draining:
            raise draining_error()
        self.manager.request_load(self)
        raise ModelLoading(self.name, self.wait_loaded, self.service.progress)

    async def wait_loaded(self) -> None:
        """Wait for the running load (the server's --load-timeout at most); its failure is
        raised as the request's error."""
        task = self.load_task
        if task is None:
            if self.loaded:
                return
            task = self.manager.request_load(self)
        try:  # a second more than the wait for room: the refusal (no room) is the answer then
            await asyncio.wait_for(asyncio.shield(task), self.manager.load_timeout + 1.0)
        except TimeoutError:
            raise LmserveError(ErrorKind.LOADING,
                               f"model '{self.name}' is still loading after "
                               f"{self.manager.load_timeout:g} s (--load-timeout)",
                               code="model_loading", retry_after=5.0) from None

    def require_ready(self) -> ModelCard:
        self._loaded()
        return self.card

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        service = self._loaded()
        system = self.entry.system  # Ollama's system layer: a chat without a system message
        if system and request.messages is not None and \
                not any(m.role == "system" for m in request.messages):
            request = replace(request, messages=[ChatMessage(role="system", content=system),
                                                 *request.messages])
        return service.prepare(request)

    async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
        return await self._loaded().fetch_media(request)

    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None, *,
              parse: bool | None = None, prompts: Prompter | None = None) -> BackendGeneration:
        service = self._loaded()
        prepared = prepared or self.prepare(request)
        generation = _Tracked(service.start(request, prepared, parse=parse, prompts=prompts),
                              self._ended)
        self._generations.add(generation)
        self._next_keep_alive = request.keep_alive
        self._hold()
        return generation

    async def embed(self, inputs: Sequence[Sequence[int] | str], adapters: AdapterSet = ()
                    ) -> list[np.ndarray]:
        service = self._loaded()
        self._embeddings += 1
        self._hold()
        try:
            return await service.embed(inputs, adapters)
        finally:
            self._embeddings -= 1
            self._ended()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._loaded().tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._loaded().detokenize(tokens)

    def adapters(self, model: str | None, selection: LoraSelection | None = None
                 ) -> AdapterSet:
        return self.service.adapters(model, selection)

    async def abort(self, request_id: str) -> bool:
        return await self.service.abort(request_id) if self.loaded else False

    async def flush_cache(self) -> CacheFlush | None:
        return await self._loaded().flush_cache()

    async def release_session(self, session: str) -> bool:
        return await self.service.release_session(session) if self.loaded else False

    def __getattr__(self, name: str) -> Any:
        """What the llama.cpp service offers beyond the contract (render_chat, model, ...)."""
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.service, name)

    # -- keep-alive -------------------------------------------------------------------------
    def set_keep_alive(self, seconds: float | None) -> None:
        """The keep-alive of the model from now on (Ollama's request field, which an empty
        request may send alone): 0 unloads it as soon as it is idle, < 0 never."""
        self._next_keep_alive = seconds
        if not self.busy:
            self._ended()

    def attach_projector(self, path: str) -> None:
        """The vision projector the library found for this model's file (under another of
        its names), loaded with the model from its next load."""
        self.entry = replace(self.entry, mmproj=path)
        self.service.found_mmproj = path

    def refresh(self) -> None:
        """Read the file's header again (reload: the file changed, or was fixed)."""
        entry = self.entry
        fresh = inspect(entry.name, entry.path, entry.source, aliases=entry.aliases,
                        shards=entry.files)
        self.entry = replace(fresh, defaults=entry.defaults, n_ctx=entry.n_ctx,
                             system=entry.system, mmproj=entry.mmproj)
        if self.service.state == "failed":
            self.service.state, self.service.error = "pending", None

    async def unload_now(self) -> bool:
        self._next_keep_alive = 0.0  # if busy: as soon as the last request ends
        return await self.manager.unload(self, reason="asked")

    def _hold(self) -> None:
        """A request started: no expiry while it runs."""
        self.last_used = time.monotonic()
        self.expires_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ended(self) -> None:
        """A request ended (or the load did): when nothing else runs, the keep-alive starts.
        On the event loop (a generation closed elsewhere, say by the garbage collector at
        shutdown, is handed to it)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            loop = self.manager.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._ended)
            return
        self.last_used = time.monotonic()
        self.manager.changed()
        if self.busy or not self.loaded:
            return
        seconds = self.keep_alive_seconds()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds < 0:
            self.expires_at = None
            return
        self.expires_at = time.time() + seconds
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(seconds, 0.0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.loaded and not self.busy and self.expires_at is not None:
            asyncio.ensure_future(self.manager.unload(self, reason="keep-alive expired"))


class _Tracked(WrappedGeneration):
    """A generation that tells its model when it is done (read to the end, or closed)."""

    def __init__(self, inner: BackendGeneration, on_end: Callable[[], None]) -> None:
        super().__init__(inner)
        self._on_end: Callable[[], None] | None = on_end

    @property
    def done(self) -> bool:
        return self._on_end is None or self.inner.finished

    async def _steps(self) -> AsyncIterator[list[ChoiceStep]]:
        try:
            async for steps in self.inner:
                yield steps
        finally:
            self._end()

    def __aiter__(self) -> AsyncIterator[list[ChoiceStep]]:
        return self._steps()

    def close(self) -> None:
        self.inner.close()
        self._end()

    def _end(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class LoadManager:
    """Which models are loaded: admission under the limits, LRU eviction of idle models,
    keep-alive expiry, unloading."""

    def __init__(self, *, max_loaded: int | None = None, memory_budget: int | None = None,
                 vram_budget: int | None = None, keep_alive: float = DEFAULT_KEEP_ALIVE,
                 load_timeout: float = DEFAULT_LOAD_TIMEOUT) -> None:
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget  # the RAM parts of the loaded models' estimates
        self.vram_budget = vram_budget  # their VRAM parts
        self.keep_alive = keep_alive
        self.load_timeout = load_timeout
        self.models: list[ManagedModel] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None

    def add(self, model: ManagedModel) -> None:
        self.models.append(model)

    def changed(self) -> None:
        """Something that a waiting load may wait for happened (a request ended, a model
        unloaded)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def request_load(self, model: ManagedModel,
                     progress: Callable[[float], None] | None = None) -> asyncio.Task[None]:
        """Start the model's load, or return the one under way (concurrent first requests
        share it). On the event loop."""
        self.loop = asyncio.get_running_loop()
        if model.load_task is None or model.load_task.done():
            model.load_task = asyncio.ensure_future(self._load(model, progress))
            model.load_task.add_done_callback(_consume)
        return model.load_task

    async def _load(self, model: ManagedModel,
                    progress: Callable[[float], None] | None) -> None:
        try:
            if model.unloading is not None:
                await model.unloading
            if model.loaded:
                return
            await self.admit(model)
            loop = asyncio.get_running_loop()
            log.info("loading model %s on demand (%s)", model.name, model.entry.path)
            try:
                await asyncio.to_thread(model.service.load, loop, progress)
            except Exception as exc:
                model.admitted = False
                raise load_failed(model.name, model.service.error or str(exc)) from None
            log.info("model %s loaded (%s, ctx %d)", model.name, model.entry.path,
                     model.service.n_ctx)
            model._ended()  # its keep-alive runs until a request comes
        finally:
            self.changed()

    async def admit(self, model: ManagedModel) -> None:
        """Make room for the model under the limits, then count it as resident. Idle models
        are unloaded least recently used first; while every resident model is busy the load
        waits for one to end (up to --load-timeout), then is refused (503 + Retry-After)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._changed = asyncio.Event()
        need = model.estimate(fresh=True)
        for part, budget, what, flag in ((need.ram, self.memory_budget, "memory", "memory"),
                                         (need.vram, self.vram_budget, "GPU memory", "vram")):
            if budget is not None and part > budget:
                raise LmserveError(ErrorKind.UNAVAILABLE,
                                   f"model '{model.name}' needs about {_mib(part)} of {what} "
                                   f"loaded, more than this server's {what} budget of "
                                   f"{_mib(budget)} (--{flag}-budget)", param="model",
                                   code="model_too_large")
        deadline = time.monotonic() + self.load_timeout
        async with self._lock:
            while True:
                resident = [m for m in self.models if m.admitted and m is not model]
                over = self._over(resident, need)
                if over is None:
                    model.admitted = True
                    return
                idle = [m for m in resident if m.loaded and not m.busy and not m.loading]
                if idle:
                    victim = min(idle, key=lambda m: m.last_used)
                    await self.unload(victim, reason=f"{over}; making room for {model.name}")
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LmserveError(ErrorKind.CAPACITY,
                                       f"cannot load model '{model.name}': {over} and every "
                                       "loaded model is busy", param="model",
                                       code="no_room_for_model", retry_after=5.0)
                await self._wait_changed(deadline)

    def _over(self, resident: list[ManagedModel], need: MemoryNeed) -> str | None:
        if self.max_loaded is not None and len(resident) + 1 > self.max_loaded:
            return f"{len(resident)} model(s) loaded (--max-loaded {self.max_loaded})"
        if self.memory_budget is None and self.vram_budget is None:
            return None
        parts = [m.estimate() for m in resident]
        if self.memory_budget is not None:
            used = sum(p.ram for p in parts)
            if used + need.ram > self.memory_budget:
                return (f"{_mib(used)} in use + {_mib(need.ram)} is over the memory budget "
                        f"of {_mib(self.memory_budget)} (--memory-budget)")
        if self.vram_budget is not None:
            used = sum(p.vram for p in parts)
            if used + need.vram > self.vram_budget:
                return (f"{_mib(used)} of GPU memory in use + {_mib(need.vram)} is over the "
                        f"GPU memory budget of {_mib(self.vram_budget)} (--vram-budget)")
        return None

    async def reload(self, model: ManagedModel) -> None:
        """Unload the model (once its requests have ended, up to --load-timeout), read its
        file's header again, and load it."""
        deadline = time.monotonic() + self.load_timeout
        while model.loaded or model.loading:
            task = model.load_task
            if task is not None and not task.done():
                await asyncio.gather(task, return_exceptions=True)
                continue
            if await self.unload(model, reason="reload"):
                break
            if time.monotonic() >= deadline:
                raise LmserveError(ErrorKind.CAPACITY, f"model '{model.name}' stayed busy; "
                                   "reload it later", param="model", code="model_busy",
                                   retry_after=5.0)
            await self._wait_changed(deadline)
        model.refresh()
        self.request_load(model)
        await model.wait_loaded()

    async def _wait_changed(self, deadline: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(),
                                   max(0.0, min(deadline - time.monotonic(), 1.0)))
        except TimeoutError:
            pass

    async def unload(self, model: ManagedModel, *, reason: str = "asked") -> bool:
        """Unload an idle model (False: it is busy, loading, or not loaded). Its engine
        thread stops and its contexts and weights are freed, in a worker thread; requests
        that arrive meanwhile wait and load it again."""
        if model.unloading is not None:
            await model.unloading
            return True
        if not model.loaded or model.busy or model.loading:
            return False
        if model._timer is not None:
            model._timer.cancel()
            model._timer = None
        model.expires_at = None
        model._next_keep_alive = None
        model.unloading = asyncio.ensure_future(asyncio.to_thread(model.service.unload))
        try:
            await model.unloading
        finally:
            model.unloading = None
            model.admitted = False
            self.changed()
        log.info("model %s unloaded (%s)", model.name, reason)
        return True


def _consume(task: asyncio.Task[None]) -> None:
    """A load's failure reaches its waiters; nobody waiting must not log it as unretrieved."""
    if not task.cancelled():
        task.exception()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
