"""The model service: what every dialect calls. Template -> tokens -> engine -> outputs."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from lmserve.chat.media import MediaPolicy, check_kinds
from lmserve.chat.media_load import MediaFetcher
from lmserve.chat.reasoning import detect_reasoning_tags
from lmserve.chat.response_schema import load_response_schema
from lmserve.chat.templates import ChatTemplate
from lmserve.chat.tools import StreamParser
from lmserve.core import observe
from lmserve.core.backend import (
    BackendGeneration,
    CacheFlush,
    EngineStats,
    LoadState,
    ModelCard,
    PlacementFacts,
    PreparedPrompt,
    WeightsFacts,
)
from lmserve.core.caller import current_caller
from lmserve.core.errors import ErrorKind, LmserveError, draining_error, invalid
from lmserve.core.events import TokenOutput
from lmserve.core.lora import AdapterSet, LoraSelection, LoraSpec, describe
from lmserve.core.lora import resolve as resolve_lora
from lmserve.core.quota import charge_tokens, metered
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.engine import hardware, kv_layout
from lmserve.engine.client import EngineClient, Generation
from lmserve.engine.disk_cache import CacheTiers, DiskCache, SavedStates
from lmserve.engine.draft_model import MTP_DRAFT, ModelDrafter, check_mtp, check_vocabulary
from lmserve.engine.lane import PrefillLane
from lmserve.engine.lora import load_adapters
from lmserve.engine.mtp_draft import MtpDrafter
from lmserve.engine.runner import (
    POOLING_MEAN,
    POOLING_NONE,
    POOLING_UNSPECIFIED,
    Batch,
    Context,
    Model,
    MtpContext,
    Placement,
    Projector,
    default_threads,
    enable_hidden_rows,
    gpu_build,
    gpu_devices,
    hidden_rows,
    offload_devices,
    read_info,
    validate_grammar,
)
from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest
from lmserve.engine.turn_memory import TurnMemory
from lmserve.generation import ParsedGeneration
from lmserve.prompting import Prompter

__all__ = ["EngineSettings", "ModelService", "PreparedPrompt", "prefill_lane_threads"]

log = logging.getLogger("lmserve.service")

# The engine's cumulative step counters (engine.scheduler.StepStats) a card's stats carry.
STEP_COUNTERS = ("prompt_tokens", "generated_tokens", "steps", "batch_tokens", "preemptions",
                 "decode_failures", "draft_tokens", "accepted_tokens", "model_draft_tokens",
                 "model_accepted_tokens", "media_chunks", "media_tokens", "media_cache_hits",
                 "prefix_waits", "lane_jobs", "lane_tokens")


def gpu_facts() -> tuple[bool, list[hardware.Device]]:
    """Whether llama.cpp has a GPU backend here, and the GPUs it sees (for /v1/plan)."""
    return gpu_build(), gpu_devices()


def prefill_lane_threads(s: EngineSettings, threads: int | None = None, *, on_gpu: bool,
                         drafting: bool) -> int:
    """The threads --prefill-lane gives the lane (0: no lane): as set, else half the threads
    (`threads`, else the settings') when the model runs on the CPU alone, with 2 threads or
    more and no draft model."""
    if s.prefill_lane is not None:
        return s.prefill_lane
    threads = threads or s.threads or default_threads()
    return threads // 2 if not on_gpu and not drafting and threads >= 2 else 0


@dataclass(frozen=True)
class EngineSettings:
    n_ctx: int | None = None  # None: the model's training context, capped (kv_layout.default_ctx)
    parallel: int = 8
    step_tokens: int = 512  # per-step token budget: decode tokens + prompt chunks
    threads: int | None = None
    threads_batch: int | None = None
    max_queue: int = 256
    max_queued_tokens: int | None = None  # prompt tokens waiting before 429; None: no cap
    cache_slots: int | None = None  # idle sequences kept for prefix reuse (default: parallel/4)
    cache_tokens: int | None = None  # idle KV tokens kept besides the newest; default n_ctx/4
    # KV tokens pinned for open sessions, all together (default: n_ctx/4 in a shared pool, no
    # token limit with split streams); at most cache_slots sessions are pinned; 0: no pins.
    session_kv_budget: int | None = None
    disk_cache_dir: str | None = None  # saved sequence states of long prefixes; None: off
    disk_cache_max_bytes: int = 4 << 30  # per model
    disk_cache_min_tokens: int = 256  # shorter prefixes are not saved or loaded
    cache_ram_bytes: int | None = None  # the RAM tier of saved states (tmpfs), per model; off
    cache_ram_min_tokens: int = 64  # shorter prefixes are not kept in the RAM tier
    embedding_ctx: int = 2048
    kv_layout: str = "auto"  # split: a KV stream of n_ctx cells per slot; shared: one pool
    #                          of n_ctx cells; auto: split when that fits (engine.kv_layout)
    lookup: int = 0  # prompt-lookup speculation: most tokens drafted per sequence (0: off)
    lookup_budget: int = 16  # most drafted tokens verified per engine step, all sequences
    mixed_prefill: int = 128  # prompt tokens a step carries while others decode (0: no cap)
    prefix_wait: int = 64  # wait for an in-flight prefix this much longer (0: never)
    # threads of the prefill lane (engine.lane): long prompts computed in a side context while
    # others decode. None: half the threads on a CPU-only model with 2 or more; 0: off
    prefill_lane: int | None = None
    prefill_lane_min: int = 512  # shorter prompts (their tokens still to compute) stay inline
    mmproj: str | None = None  # projector GGUF (vision, audio); None: the one found for the model
    media_cache_bytes: int = 256 << 20  # encoded image embeddings kept in memory (LRU)
    media_cache_dir: str | None = None  # and on disk here (engine.media_cache); None: not
    media_cache_disk_bytes: int = 1 << 30  # the disk tier's bound (LRU files)
    draft: str | None = None  # a draft model's GGUF (resolved by config): draft-model speculation;
    #                           "mtp": the model's own MTP / NextN layers draft (engine.mtp_draft)
    draft_max: int = 8  # most tokens the draft model guesses per sequence and step
    chat_template: str | None = None  # override source
    # parses chat output into content, reasoning and tool calls in place of the built-in
    # parsers: the schema's JSON text, checked (chat.response_schema)
    response_schema: str | None = None
    loras: tuple[LoraSpec, ...] = ()  # LoRA adapters loaded with the model (core.lora)
    context_overflow: str = "error"  # a chat that does not fit: error | truncate
    media: MediaPolicy = MediaPolicy()  # image input: sizes, hosts, directory (chat.media)
    # Where the model runs (engine.hardware): GPU offload and the KV cache's element types.
    gpu_layers: str = "auto"  # auto | all | a count; auto is 0 on a CPU-only build
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    flash_attn: str = "auto"
    kv_offload: bool = True  # the KV cache on the GPU with its layers
    op_offload: bool = True
    mlock: bool = False
    mmap: bool = True
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    # llama.cpp RPC servers (HOST:PORT) whose devices take the offloaded layers, before this
    # host's GPUs (engine.runner.offload_devices; docs/deploy.md)
    rpc: tuple[str, ...] = ()


class ModelService:
    """One GGUF model served by lmserve's llama.cpp engine: its engine thread, chat template
    and embedding context. Implements the backend contract (lmserve.core.backend)."""

    kind = "llama.cpp"

    def __init__(self, name: str, path: str, settings: EngineSettings,
                 aliases: Sequence[str] = ()) -> None:
        self.name = name
        self.path = path
        self.aliases = tuple(aliases)
        self.settings = settings
        self.state = "pending"  # pending -> loading -> ready | failed
        self.progress = 0.0
        self.error: str | None = None
        self.created = int(time.time())
        self.model: Model | None = None
        self.draft_model: Model | None = None  # --draft: its weights, and its context below
        self._draft_ctx: Context | MtpContext | None = None
        self._lane: PrefillLane | None = None
        self._lane_ctx: Context | None = None  # the lane's side context
        self._draft_place = Placement()
        self.client: EngineClient | None = None
        self.template: ChatTemplate | None = None
        self.prompter: Prompter | None = None  # once loaded
        # recent answers' ids, so a conversation's next prompt reuses their KV (once loaded)
        self.turns: TurnMemory | None = None
        self.n_ctx = 0
        self.layout = kv_layout.Layout(False, "not loaded")  # the engine's KV layout, and why
        self.placement = Placement()  # where llama.cpp puts the weights and KV, once loading
        self.offload = hardware.Offload(0, 0, "not loaded")  # the GPU layers, and why
        self.kv_bytes = 0  # the KV cache's size (all streams), once loaded
        self._embed_ctx: Context | None = None
        self._embed_lock = threading.Lock()
        self._view: tuple[EngineSettings, Mapping[str, Any], int] | None = None
        self._draining = False
        self.projector: Projector | None = None  # the multimodal projector (mmproj), if loaded
        self._ram_cache: DiskCache | None = None  # saved states in RAM (--cache-ram)
        self._disk_cache: DiskCache | None = None  # saved states on disk (--disk-cache)
        self.found_mmproj: str | None = None  # a projector the library matched to the model
        #                                       (models.projectors), used without settings.mmproj
        self.media_fetcher = MediaFetcher()  # image URLs, downloaded before preparation

    # -- lifecycle --------------------------------------------------------------------------
    def load(self, loop: asyncio.AbstractEventLoop,
             progress: Callable[[float], None] | None = None) -> None:
        """Blocking: load weights, create the context, start the engine thread."""
        self.state = "loading"

        def on_progress(fraction: float) -> None:
            self.progress = fraction
            if progress:
                progress(fraction)

        try:
            self.placement, self.offload = self._placement()
            log.info("model %s: %s%s", self.name, self.offload.reason,
                     f" ({', '.join(self.offload.devices)})" if self.offload.devices else "")
            self.model = Model(self.path, progress=on_progress, placement=self.placement,
                               load_mtp=self.settings.draft == MTP_DRAFT)
            shape = kv_layout.kv_shape_from_metadata(self.model.info.metadata)
            hardware.check_kv_types(self.placement.cache_type_k, self.placement.cache_type_v,
                                    self.placement.flash_attn,
                                    key_width=shape[2] if shape else None,
                                    value_width=shape[3] if shape else None)
            self._load_draft()
            self._load_projector()
            self._start_engine(loop)
            self.template = self._load_template()
            self.state, self.progress = "ready", 1.0
        except Exception as exc:
            self._close_draft()
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("could not load model %s from %s: %s", self.name, self.path, self.error)
            raise

    def _load_draft(self) -> None:
        """Load --draft's weights (whole on the GPU when the target uses one) and refuse a
        model whose vocabulary is not the target's (engine.draft_model)."""
        assert self.model is not None
        if self.settings.draft == MTP_DRAFT:
            check_mtp(self.model, self.name)
            return
        if self.model.nextn_layers:
            log.info("model %s carries %d MTP/NextN layers (--draft mtp drafts with them)",
                     self.name, self.model.nextn_layers)
        if not self.settings.draft:
            return
        place = Placement(gpu_layers=999 if self.placement.gpu_layers else 0,
                          main_gpu=self.placement.main_gpu, mmap=self.placement.mmap,
                          flash_attn=self.placement.flash_attn)
        self._draft_place = place
        self.draft_model = Model(self.settings.draft, placement=place)
        check_vocabulary(self.model, self.draft_model, self.name)

    def _drafter(self, target: Context, split: bool,
                 threads: int) -> ModelDrafter[Batch] | MtpDrafter | None:
        """The draft model's context (or the MTP head's), as many sequences as run at once, KV
        laid out like the target's (a stream of one sequence's room each, or one pool with
        room for the guesses), and its drafter."""
        s, draft = self.settings, self.draft_model
        n_ctx = self.n_ctx * s.parallel if split else self.n_ctx + s.parallel * (s.draft_max + 1)
        if s.draft == MTP_DRAFT and self.model is not None:
            self._draft_ctx = mtp = MtpContext(
                target, n_ctx=n_ctx, n_seq_max=s.parallel, n_batch=target.n_batch,
                n_threads=threads, n_threads_batch=s.threads_batch or threads,
                kv_unified=not split)
            enable_hidden_rows(target)
            # A guess costs a verification row (about half a step) and a row of the head
            # (its layers' share of the model's).
            share = self.model.nextn_layers / max(1, self.model.info.n_layer)
            log.info("model %s: drafting with its %d MTP/NextN layers", self.name,
                     self.model.nextn_layers)
            return MtpDrafter(mtp, lambda first, n: hidden_rows(target, first, n),
                              max_tokens=s.draft_max, n_seqs=s.parallel,
                              eog_tokens=self.model.eog_tokens, row_cost=min(0.9, 0.5 + share))
        if draft is None or self.model is None:
            return None
        self._draft_ctx = ctx = Context(
            draft, n_ctx=n_ctx, n_seq_max=s.parallel, n_batch=max(s.step_tokens, s.parallel),
            n_threads=threads, n_threads_batch=s.threads_batch or threads,
            kv_unified=not split, placement=self._draft_place)
        # A guess costs a verification row (about half a step) and a draft decode row (about
        # the models' size ratio of a step); capped so that a draft right nearly every time
        # is still tried whatever it costs.
        ratio = draft.info.n_params / max(1, self.model.info.n_params)
        log.info("model %s: drafting with %s (%.2f of its parameters)", self.name, draft.path,
                 ratio)
        return ModelDrafter(ctx, max_tokens=s.draft_max, n_seqs=s.parallel,
                            n_vocab=self.model.n_vocab, eog_tokens=self.model.eog_tokens,
                            row_cost=min(0.9, 0.5 + ratio))

    def _prefill_lane(self, ctx: Context, threads: int, drafting: bool) -> PrefillLane | None:
        """The prefill lane and its side context: one sequence of the engine's room, the same
        KV types, `lane` of the threads (engine.lane). Auto: half the threads when the model
        runs on the CPU alone; off with a draft model, whose context follows the engine's
        batches and would miss the prompts computed aside."""
        s, model = self.settings, self.model
        assert model is not None
        lane_threads = prefill_lane_threads(s, threads, on_gpu=self.placement.gpu_layers > 0,
                                            drafting=drafting)
        if not lane_threads:
            return None
        if drafting:
            log.warning("model %s: no prefill lane with a draft model (its context follows "
                        "the engine's batches)", self.name)
            return None
        if lane_threads >= threads:
            raise invalid(f"--prefill-lane {lane_threads} leaves none of the {threads} threads "
                          "for decoding (set it below --threads)", param="prefill_lane")
        chunk = min(256, ctx.n_batch)
        side = self._lane_ctx = Context(model, n_ctx=self.n_ctx, n_seq_max=1, n_batch=chunk,
                                        n_threads=lane_threads, placement=self.placement)
        log.info("model %s: prefill lane on %d of %d threads for prompts of %d tokens or more",
                 self.name, lane_threads, threads, s.prefill_lane_min)
        return PrefillLane(side, ctx, threads=threads, lane_threads=lane_threads,
                           min_tokens=s.prefill_lane_min, chunk=chunk)

    def _close_lane(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None and not lane.close():
            log.warning("model %s: the prefill lane did not stop; its context is left "
                        "allocated", self.name)
            self._lane_ctx = None
        if self._lane_ctx is not None:
            self._lane_ctx.close()
            self._lane_ctx = None

    def _close_draft(self) -> None:
        if self._draft_ctx is not None:
            self._draft_ctx.close()
            self._draft_ctx = None
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None

    def _cache_slots(self) -> int:
        s = self.settings
        return s.cache_slots if s.cache_slots is not None else \
            kv_layout.default_cache_slots(s.parallel)

    def _placement(self) -> tuple[Placement, hardware.Offload]:
        """The layers to offload (engine.hardware.offload) and the KV types, before loading.
        Only an auto setting on a machine with a GPU needs the model's shape (read without
        its weights)."""
        s = self.settings
        if s.gpu_layers == "0":
            devices = []
            if s.rpc:
                log.warning("model %s: --rpc with --gpu-layers 0 offloads nothing to the RPC "
                            "servers", self.name)
        else:
            devices = [d for _, d in offload_devices(s.rpc)] if s.rpc else gpu_devices()
        n_layer, size, kv_bytes = 0, 0, 0
        if devices:
            info = read_info(self.path)
            n_layer, size = info.n_layer, info.size_bytes
            per_token = kv_layout.bytes_per_token_from_metadata(
                info.metadata, s.cache_type_k, s.cache_type_v) or 0
            n_ctx = s.n_ctx or kv_layout.default_ctx(info.n_ctx_train)
            slots = s.parallel + self._cache_slots()
            kv_bytes = per_token * n_ctx * slots
        plan = hardware.offload(s.gpu_layers, n_layer=n_layer, size_bytes=size,
                                kv_bytes=kv_bytes, kv_offload=s.kv_offload, devices=devices,
                                gpu_build=bool(devices) or gpu_build())
        layers = plan.layers
        return Placement(
            gpu_layers=layers, split_mode=s.split_mode, main_gpu=s.main_gpu,
            tensor_split=s.tensor_split, mmap=s.mmap, mlock=s.mlock,
            cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v,
            flash_attn=s.flash_attn, kv_offload=s.kv_offload, op_offload=s.op_offload,
            rpc=s.rpc if layers else ()), plan

    def _start_engine(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.model is not None
        s, info = self.settings, self.model.info
        load_adapters(self.model, s.loras)
        self.n_ctx = s.n_ctx or kv_layout.default_ctx(info.n_ctx_train)
        n_slots = s.parallel + self._cache_slots()
        threads = s.threads or default_threads()
        layout = kv_layout.choose(
            s.kv_layout, n_ctx=self.n_ctx, n_slots=n_slots, memory=kv_layout.machine_memory(),
            bytes_per_token=kv_layout.bytes_per_token_from_metadata(
                info.metadata, s.cache_type_k, s.cache_type_v))

        model = self.model

        def context(split: bool) -> Context:
            return Context(model, n_ctx=self.n_ctx * (n_slots if split else 1),
                           n_seq_max=n_slots, n_batch=max(s.step_tokens, s.parallel),
                           n_threads=threads, n_threads_batch=s.threads_batch or threads,
                           kv_unified=not split, placement=self.placement)

        try:
            ctx = context(layout.split)
        except RuntimeError as exc:
            if not (layout.split and s.kv_layout == "auto"):
                raise
            layout = kv_layout.fallback(self.n_ctx, n_slots, exc)
            ctx = context(False)
        self.layout = layout
        log.info("model %s: %s", self.name, layout.reason)
        per_token = kv_layout.bytes_per_token_from_metadata(
            info.metadata, s.cache_type_k, s.cache_type_v) or 0
        self.kv_bytes = per_token * self.n_ctx * (n_slots if layout.split else 1)
        self.n_ctx = ctx.n_ctx  # one sequence's room
        ctx.projector = self.projector
        # Idle KV in a unified pool slows every decode, so it is budgeted; split, it does not.
        idle_tokens = s.cache_tokens if s.cache_tokens is not None else \
            (None if layout.split else self.n_ctx // 4)
        drafter = self._drafter(ctx, layout.split, threads)
        pin_tokens = s.session_kv_budget if s.session_kv_budget is not None else \
            (None if layout.split else self.n_ctx // 4)
        lane = self._lane = self._prefill_lane(ctx, threads, drafter is not None)

        def core_factory(sink: Callable[[StepOutputs], None]) -> EngineCore[Batch]:
            return EngineCore(ctx, n_slots=n_slots, max_running=s.parallel,
                              step_tokens=max(s.step_tokens, s.parallel), sink=sink,
                              idle_tokens=idle_tokens, lookup_tokens=s.lookup,
                              lookup_budget=s.lookup_budget, packed=layout.split,
                              drafter=drafter, pin_tokens=pin_tokens,
                              mixed_prefill=s.mixed_prefill or None,
                              prefix_wait=s.prefix_wait, lane=lane)

        self.client = EngineClient(core_factory, loop=loop, max_queue=s.max_queue,
                                   max_queued_tokens=s.max_queued_tokens, name=self.name)
        self.turns = TurnMemory(self.model.token_bytes, self.model.eog_tokens)
        self.client.draining = self._draining
        self._ram_cache = self._disk_cache = None
        if s.cache_ram_bytes:
            self._ram_cache = DiskCache.open_ram(ctx, model_path=self.path,
                                                 max_bytes=s.cache_ram_bytes,
                                                 min_tokens=s.cache_ram_min_tokens)
        if s.disk_cache_dir:
            self._disk_cache = DiskCache.open(
                s.disk_cache_dir, ctx, model_path=self.path, max_bytes=s.disk_cache_max_bytes,
                min_tokens=s.disk_cache_min_tokens)
        saved: SavedStates | None = self._ram_cache or self._disk_cache
        if self._ram_cache is not None and self._disk_cache is not None:
            saved = CacheTiers(self._ram_cache, self._disk_cache)
        self.client.core.pool.disk = saved
        self.client.start()

    def _load_template(self) -> ChatTemplate | None:
        assert self.model is not None
        info = self.model.info
        source = self.settings.chat_template or info.chat_template
        if not source:
            return None
        return ChatTemplate(source, bos_token=info.bos_token, eos_token=info.eos_token,
                            name=self.name)

    def drain(self) -> None:
        """Refuse new generations and embeddings from now on (503 draining); running and
        queued requests go on."""
        self._draining = True
        if self.client is not None:
            self.client.draining = True

    @property
    def busy(self) -> int:
        """Requests submitted and not yet done (running, queued, or being read)."""
        return self.client.active if self.client is not None else 0

    async def fail_all(self, error: LmserveError) -> None:
        """End every running and queued request with this error, each in its own stream."""
        if self.client is not None:
            await self.client.fail_all(error.message, error.kind)

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
            if self.client.core.pool.disk is not None:
                self.client.core.pool.disk.close()  # finish the queued writes
        self._close_lane()
        self._close_draft()
        self.media_fetcher.close()
        if self.projector is not None:
            self.projector.close_disk()  # finish the queued embedding writes

    def unload(self) -> None:
        """Blocking: stop the engine thread (nothing may run: the caller checks `busy`), free
        the context, the embedding context and the weights. The model is pending again, and
        `load` loads it anew (the disk cache's states are kept on disk)."""
        client, self.client = self.client, None
        if client is not None:
            client.stop()
            if client.core.pool.disk is not None:
                client.core.pool.disk.close()
            self._close_draft()  # an MTP context before the target's
            self._close_lane()
            if isinstance(client.core.runner, Context):
                client.core.runner.close()
        with self._embed_lock:
            if self._embed_ctx is not None:
                self._embed_ctx.close()
                self._embed_ctx = None
        self._close_draft()
        projector, self.projector = self.projector, None
        if projector is not None:
            projector.close()
        model, self.model = self.model, None
        self.template, self.prompter, self.turns = None, None, None
        if model is not None:
            model.close()
        self.state, self.progress, self.error, self.n_ctx = "pending", 0.0, None, 0
        self.layout = kv_layout.Layout(False, "not loaded")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def healthy(self) -> bool:
        return self.state != "failed" and (self.client is None or self.client.alive)

    # -- the card ---------------------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        s, model = self.settings, self.model
        weights = None
        if model is not None:
            info = model.info
            weights = WeightsFacts(architecture=info.architecture, n_ctx_train=info.n_ctx_train,
                                   n_params=info.n_params, n_embd=info.n_embd,
                                   n_vocab=info.n_vocab, size_bytes=info.size_bytes,
                                   metadata=info.metadata)
        settings, threads = self._settings_view()
        return ModelCard(
            name=self.name, aliases=self.aliases, kind=self.kind, source=self.path,
            state=LoadState(self.state), progress=self.progress, error=self.error,
            created=self.created, n_ctx=self.n_ctx, parallel=s.parallel, max_queue=s.max_queue,
            step_tokens=s.step_tokens, threads=threads,
            embedding_ctx=s.embedding_ctx,
            chat_template=self.template.source if self.template is not None else None,
            reasoning_tags=self.reasoning_tags, vision=self.vision, audio=self.audio,
            loras=s.loras,
            kv_layout=("split" if self.layout.split else "shared") if model else None,
            weights=weights, placement=self._placement_facts() if model else None,
            settings=settings)

    def _placement_facts(self) -> PlacementFacts:
        place, plan = self.placement, self.offload
        size = self.model.info.size_bytes if self.model is not None else 0
        return PlacementFacts(
            where=plan.where, gpu_layers=plan.layers, reason=plan.reason,
            n_layer=plan.n_layer or (self.model.info.n_layer if self.model is not None else 0),
            weights_gpu_bytes=plan.weights_on_gpu(size) if plan.n_layer else 0,
            kv_where="gpu" if plan.layers > 0 and place.kv_offload else "cpu",
            cache_type_k=place.cache_type_k, cache_type_v=place.cache_type_v,
            kv_bytes=self.kv_bytes, flash_attn=place.flash_attn, devices=plan.devices)

    def _settings_view(self) -> tuple[Mapping[str, Any], int]:
        """The card's read-only view of the settings and the threads they mean, made once per
        settings object (the card is read several times a request; settings never change)."""
        s = self.settings
        if self._view is None or self._view[0] is not s:
            view = {k: v for k, v in asdict(s).items()
                    if k not in ("chat_template", "response_schema")}
            view["chat_template_override"] = s.chat_template is not None
            view["response_schema"] = s.response_schema is not None
            self._view = (s, MappingProxyType(view), s.threads or default_threads())
        return self._view[1], self._view[2]

    def stats(self) -> EngineStats | None:
        """The engine's counters; None before the engine runs."""
        client = self.client
        if client is None:
            return None
        core = client.core
        st = core.stats
        disk, ram = self._disk_cache, self._ram_cache
        disk_stats = asdict(disk.stats) if disk is not None else None
        rotation = core.adapters
        return EngineStats(
            alive=client.alive, error=client.error, active_requests=client.active,
            running=len(core.running), waiting=len(core.waiting),
            prefix_cache_hits=core.pool.hits, prefix_cache_tokens=core.pool.reused_tokens,
            counters={**{k: getattr(st, k) for k in STEP_COUNTERS}, **self._media_disk(),
                      "turn_reuses": self.turns.hits if self.turns is not None else 0},
            phases={p: getattr(st, p) for p in st.phases},
            last_step_sequences=st.last_step_sequences, disk_cache=disk_stats,
            ram_cache=asdict(ram.stats) if ram is not None else None,
            adapter_steps={describe(a, self.settings.loras): n
                           for a, n in list(rotation.steps.items())} if self.settings.loras else {},
            adapter_switches=rotation.switches)

    def _media_disk(self) -> dict[str, int]:
        disk = self.projector.disk if self.projector is not None else None
        return {"media_disk_hits": disk.stats.hits, "media_disk_writes": disk.stats.writes} \
            if disk is not None else {}

    # -- prompts ----------------------------------------------------------------------------
    def require_ready(self) -> ModelCard:
        self._loaded()
        return self.card

    def _loaded(self) -> Model:
        if self.state == "failed":
            raise LmserveError(ErrorKind.INTERNAL,
                               f"model '{self.name}' failed to load: {self.error}")
        if not self.ready or self.model is None:
            raise LmserveError(ErrorKind.LOADING, f"model '{self.name}' is still loading "
                               f"({self.progress:.0%})", code="model_loading", retry_after=2.0)
        if self.client is not None and not self.client.alive:
            raise LmserveError(ErrorKind.INTERNAL, f"model '{self.name}' engine stopped: "
                               f"{self.client.error}")
        return self.model

    def _prompts(self) -> Prompter:
        """The prompter of the loaded model, made anew when what it depends on changed."""
        model, s = self._loaded(), self.settings
        p = self.prompter
        if p is None or p.vocab is not model or p.template is not self.template or \
                p.n_ctx != self.n_ctx or p.media != s.media or \
                p.context_overflow != s.context_overflow or p.projector is not self.projector \
                or (p.response_schema and p.response_schema.source) != s.response_schema \
                or p.turns is not self.turns:
            schema = load_response_schema(s.response_schema) if s.response_schema else None
            p = self.prompter = Prompter(self.name, model, self.template, n_ctx=self.n_ctx,
                                         media=s.media, context_overflow=s.context_overflow,
                                         projector=self.projector, response_schema=schema,
                                         turns=self.turns)
        return p

    def render_chat(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        return self._prompts().render_chat(messages, add_generation_prompt=add_generation_prompt,
                                           template_kwargs=template_kwargs, tools=tools)

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        return self._prompts().prepare(request)

    async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
        """Media URLs downloaded under the media policy, for a model with a projector that
        takes every kind the request holds (else preparation refuses them: nothing is fetched
        for nothing)."""
        media = [item for m in request.messages or () for item in m.images]
        if not media or (self.vision, self.audio) == (False, False):
            return request
        check_kinds(self.name, media, vision=self.vision, audio=self.audio)
        return await self.media_fetcher.fetch_images(request, self.settings.media)

    @property
    def vision(self) -> bool:
        """Whether a projector (mmproj) that takes images is loaded."""
        return self.projector is not None and self.projector.vision

    @property
    def audio(self) -> bool:
        """Whether a projector (mmproj) with an audio encoder is loaded."""
        return self.projector is not None and self.projector.audio

    def mmproj_path(self) -> str | None:
        """The projector to load: --mmproj / mmproj_path, else the one the library found for
        the model (models.projectors: one named after it, or the one beside it in a folder of
        its own)."""
        if self.settings.mmproj:
            return os.path.expanduser(self.settings.mmproj)
        return self.found_mmproj

    def _load_projector(self) -> None:
        assert self.model is not None
        path = self.mmproj_path()
        if path is None:
            return
        if not os.path.isfile(path):
            raise RuntimeError(f"the projector file {path!r} (--mmproj) does not exist")
        try:
            projector = Projector(self.model, path,
                                  n_threads=self.settings.threads or default_threads(),
                                  use_gpu=self.placement.gpu_layers > 0,
                                  cache_bytes=self.settings.media_cache_bytes,
                                  disk_dir=self.settings.media_cache_dir,
                                  disk_bytes=self.settings.media_cache_disk_bytes)
        except RuntimeError as exc:
            if self.settings.mmproj:  # asked for: the load fails
                raise
            # found beside the model, not asked for: the model serves text only
            log.warning("model %s: the projector found for it is not used: %s", self.name, exc)
            return
        self.projector = projector
        takes = " and ".join(k for k, on in (("images", projector.vision),
                                             ("audio", projector.audio)) if on)
        log.info("model %s: projector %s (%s)", self.name, path, takes or "no inputs")

    @property
    def reasoning_tags(self) -> tuple[str, str] | None:
        """The think tags of the chat template, if it has any."""
        return detect_reasoning_tags(self.template.source if self.template else None)

    def chat_parser(self, request: GenerationRequest, prepared: PreparedPrompt) -> StreamParser:
        """A fresh parser for one choice: reasoning first, then tool calls."""
        return self._prompts().chat_parser(request, prepared)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._loaded().detokenize(list(tokens))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._prompts().tokenize(text, add_special=add_special)

    def check_context(self, n_prompt: int, max_tokens: int | None, *,
                      truncating: bool = False, param: str = "messages") -> int:
        """Validate prompt length against the context; returns the effective max_tokens."""
        return self._prompts().check_context(n_prompt, max_tokens, truncating=truncating,
                                             param=param)

    # -- generation -------------------------------------------------------------------------
    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None, *,
              parse: bool | None = None, prompts: Prompter | None = None) -> BackendGeneration:
        """Validate and submit now, so every refusal happens before a response starts.
        `parse`: run each choice's output through the chat parser (default: chat requests).
        `prompts`: the prompter whose parser reads the output (a name's own chat template or
        response schema over this engine, models.views); default this model's.
        The request's meter (core.quota: per-request and per-key token limits) applies."""
        prepared = prepared or self.prepare(request)
        return metered(request, len(prepared.tokens),
                       lambda admitted: self._start(admitted, prepared, parse, prompts))

    def _start(self, request: GenerationRequest, prepared: PreparedPrompt,
               parse: bool | None, prompts: Prompter | None = None) -> ParsedGeneration:
        generation = self.submit(request, prepared)
        if parse is None:
            parse = request.messages is not None
        if not parse:
            return ParsedGeneration(generation)
        if prompts is not None:
            return ParsedGeneration(generation, lambda: prompts.chat_parser(request, prepared))
        return ParsedGeneration(generation, lambda: self.chat_parser(request, prepared))

    def submit(self, request: GenerationRequest, prepared: PreparedPrompt | None = None
               ) -> Generation:
        """The engine-level start: raw step outputs, no parsing (the in-process benchmark)."""
        adapters = self.adapters(request.model, request.lora)
        prepared = prepared or self.prepare(request)
        max_tokens = self.check_context(
            len(prepared.tokens), request.max_tokens, truncating=prepared.truncating,
            param="messages" if request.messages is not None else "prompt")
        if request.n > self.settings.parallel:
            raise invalid(f"n={request.n} is more than this server's parallel sequences "
                          f"({self.settings.parallel})", param="n")
        sampling = request.sampling
        if prepared.grammar is not None:
            if sampling.grammar:
                raise invalid("a grammar was given twice (structured output or a forced tool "
                              "call, and a raw grammar); send one", param="grammar")
            sampling = sampling.replace(grammar=prepared.grammar)
        if sampling.grammar:
            self.check_grammar(sampling.grammar)
        assert self.client is not None
        if prepared.media and request.prompt_logprobs is not None:
            raise invalid("prompt logprobs are not available for a prompt with images or audio",
                          param="prompt_logprobs")
        engine_request = EngineRequest(
            prompt_tokens=prepared.tokens, sampling=sampling, max_tokens=max_tokens,
            stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
            ignore_eos=request.ignore_eos, n=request.n, logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs, render_special=prepared.markers,
            adapters=adapters, priority=request.priority, pin=request.session,
            caller=request.caller if request.caller is not None else current_caller(),
            media=tuple(prepared.media))
        if request.request_id:
            engine_request.request_id = request.request_id
        engine_request.correlation_id = observe.current_request_id()
        generation = self.client.submit(engine_request)
        turns, text = self.turns, prepared.text
        if turns is not None and text is not None and request.messages is not None \
                and not prepared.media:  # its answer's ids, for the conversation's next turn
            tokens = prepared.tokens
            generation.on_done = lambda output: turns.remember(text, tokens, output)
        observe.note_generation(self.name, engine_request.timing)
        return generation

    def adapters(self, model: str | None, selection: LoraSelection | None = None) -> AdapterSet:
        """The LoRA set a request runs under: from "<model>:<alias>" or its lora field."""
        return resolve_lora(self.settings.loras, model, selection, (self.name, *self.aliases))

    def check_grammar(self, gbnf: str, param: str = "grammar") -> None:
        """Refuse a grammar llama.cpp cannot parse before it reaches the engine thread."""
        try:
            validate_grammar(self._loaded(), gbnf)
        except ValueError as exc:
            raise invalid(f"the grammar was refused: {exc}", param=param,
                          code="invalid_grammar") from None

    async def generate(self, request: GenerationRequest, prepared: PreparedPrompt | None = None
                       ) -> AsyncIterator[list[TokenOutput]]:
        async for outputs in self.submit(request, prepared):
            yield outputs

    async def abort(self, request_id: str) -> bool:
        """Abort a running or queued request by id; False if none such is known here."""
        if self.client is None or not self.client.has_request(request_id):
            return False
        self.client.abort(request_id)
        return True

    async def flush_cache(self) -> CacheFlush | None:
        """Drop the idle prefix cache, then the disk cache's saved states; None (nothing done)
        while requests run or wait. The memory side is decided on the engine thread, so no
        request can start between the check and the flush; the files are removed off it."""
        self._loaded()
        assert self.client is not None
        done: tuple[int, SavedStates | None] | None = await self.client.call(
            lambda core: None if core.has_work else (core.pool.flush(), core.pool.disk))
        if done is None:
            return None
        flushed, disk = done
        if disk is None:
            return CacheFlush(flushed)
        removed = await asyncio.to_thread(disk.clear)
        if removed is None:
            return CacheFlush(flushed, disk_kept="states still being written after 30 s")
        return CacheFlush(flushed, disk_states=removed)

    async def release_session(self, session: str) -> bool:
        """Unpin a session's KV (engine.prefix_cache); False when none was pinned."""
        if self.client is None:
            return False
        released: bool = await self.client.call(lambda core: core.unpin(session))
        return released

    # -- embeddings -------------------------------------------------------------------------
    async def embed(self, inputs: Sequence[Sequence[int] | str], adapters: AdapterSet = ()
                    ) -> list[np.ndarray]:
        self._loaded()
        observe.note_model(self.name)
        if self._draining:
            raise draining_error()
        token_lists = [self.tokenize(x) if isinstance(x, str) else list(x) for x in inputs]
        limit = self.settings.embedding_ctx
        for i, tokens in enumerate(token_lists):
            if not tokens:
                raise invalid(f"input[{i}] is empty", param="input")
            if len(tokens) > limit:
                raise LmserveError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                                   f"input[{i}] has {len(tokens)} tokens; the embedding context "
                                   f"holds {limit}", param="input", code="context_length_exceeded")
        charge_tokens(sum(len(tokens) for tokens in token_lists))  # the key's tokens a minute
        return await asyncio.to_thread(self._embed_blocking, token_lists, adapters)

    def _embed_blocking(self, inputs: list[list[int]], adapters: AdapterSet) -> list[np.ndarray]:
        with self._embed_lock:
            ctx = self._embedding_context()
            ctx.set_adapters(adapters)
            out: list[np.ndarray] = []
            for tokens in inputs:  # one sequence per decode: pooled output needs it whole
                ctx.clear()
                ctx.batch.clear()
                ctx.batch.add(tokens, 0, 0, True)
                ctx.batch.logits[: ctx.batch.n] = 1
                if ctx.decode(ctx.batch) != 0:
                    raise LmserveError(ErrorKind.INTERNAL, "embedding decode failed")
                out.append(ctx.sequence_embedding(0))
            ctx.clear()
            return out

    def _embedding_context(self) -> Context:
        if self._embed_ctx is None:
            self._embed_ctx = self._new_embedding_context(None)
            if self._embed_ctx.pooling_type() in (POOLING_NONE, POOLING_UNSPECIFIED):
                # Generative GGUFs declare no pooling; mean pooling is the usual choice for them.
                self._embed_ctx.close()
                self._embed_ctx = self._new_embedding_context(POOLING_MEAN)
        return self._embed_ctx

    def _new_embedding_context(self, pooling: int | None) -> Context:
        assert self.model is not None
        n = self.settings.embedding_ctx
        return Context(self.model, n_ctx=n, n_seq_max=1, n_batch=n,
                       n_threads=self.settings.threads or default_threads(),
                       embeddings=True, pooling_type=pooling, placement=self.placement)

