"""The engine core: admission, chunked prefill mixed with decode, one llama_decode per step.

A step reads: admit -> plan -> build batch -> decode -> sample -> postprocess -> emit.
It runs with any runner that offers the small surface in `Runner` below, which is what
lets the scheduling logic be tested without a model.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lmserve.core.errors import ErrorKind
from lmserve.core.events import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    TokenOutput,
)
from lmserve.core.images import MediaSpan
from lmserve.core.request import SamplingParams
from lmserve.engine import media
from lmserve.engine.admission import WaitQueue
from lmserve.engine.lane import PrefillLane
from lmserve.engine.logprobs import LogitsSource, LogprobScorer
from lmserve.engine.lookup import DraftLength, NgramIndex
from lmserve.engine.lora import AdapterRotation, AdapterTarget
from lmserve.engine.prefix_cache import KVMemory, SlotPool
from lmserve.engine.sequence import EngineRequest, SamplerLike, SeqState, Sequence
from lmserve.engine.token_prefix import common_prefix_len

log = logging.getLogger("lmserve.engine")

StepOutputs = list[tuple[EngineRequest, list[TokenOutput]]]

DECODE_OK = 0
DECODE_NO_KV_SLOT = 1


class Batch(Protocol):
    n: int
    def clear(self) -> None: ...
    def add(self, tokens: list[int], start_pos: int, seq_id: int,
            want_last_logits: bool) -> int: ...
    def request_logits(self, start: int, stop: int) -> None: ...


# The runner's own batch type: the core fills the runner's batch and hands that same batch back
# to its decode, which may read more of it than `Batch` shows (runner.Batch's llama_batch).
B = TypeVar("B", bound=Batch)


class Runner(KVMemory, LogitsSource, AdapterTarget, Protocol[B]):
    """What the core needs from llama.cpp (runner.Context + runner.Model, or a fake)."""

    n_ctx: int
    eog_tokens: frozenset[int]
    @property
    def batch(self) -> B: ...
    def decode(self, batch: B) -> int: ...
    def decode_media(self, span: MediaSpan, seq_id: int) -> tuple[int, bool]: ...
    def piece(self, token: int) -> bytes: ...
    def make_sampler(self, params: SamplingParams, seed: int,
                     banned: Iterable[int]) -> SamplerLike: ...


class Drafter(Protocol):
    """A model that guesses tokens for decoding sequences (engine.draft_model.ModelDrafter, or
    engine.mtp_draft.MtpDrafter with the model's own MTP layers)."""

    def length(self) -> DraftLength: ...
    def draft(self, wanted: list[tuple[Sequence, int]]) -> dict[Sequence, list[int]]: ...
    def forget(self, seq: Sequence) -> None: ...
    # after each decoded step: (sequence, its first batch row, first position, tokens)
    def observe(self, rows: Tokens[tuple[Sequence, int, int, Tokens[int]]]) -> None: ...


@dataclass
class StepStats:
    """Cumulative per-phase timings (seconds) and counters, read by metrics and benchmarks."""

    steps: int = 0
    schedule: float = 0.0
    batch_build: float = 0.0
    decode: float = 0.0
    sample: float = 0.0
    detokenize: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    batch_tokens: int = 0
    decode_failures: int = 0
    preemptions: int = 0
    draft_tokens: int = 0  # prompt-lookup tokens proposed and verified
    accepted_tokens: int = 0  # of those, the ones the sampler agreed with
    draft_steps: int = 0  # sequence-steps that carried a draft
    model_draft_tokens: int = 0  # draft-model tokens proposed and verified
    model_accepted_tokens: int = 0  # of those, the ones the sampler agreed with
    draft: float = 0.0  # seconds the draft model spent drafting (not in schedule)
    media_chunks: int = 0  # images decoded into sequences' KV (own steps)
    media_tokens: int = 0  # the positions they filled
    media_cache_hits: int = 0  # of those images, the ones whose embeddings were cached
    prefix_waits: int = 0  # requests held until a prefix another sequence computes was ready
    lane_jobs: int = 0  # prompts the prefill lane computed (engine.lane)
    lane_tokens: int = 0  # their tokens (in prompt_tokens too)
    last_step_sequences: int = 0
    phases: tuple[str, ...] = field(default=("schedule", "draft", "batch_build", "decode",
                                              "sample", "detokenize"), repr=False)


class EngineCore(Generic[B]):
    def __init__(self, runner: Runner[B], *, n_slots: int, max_running: int, step_tokens: int,
                 sink: Callable[[StepOutputs], None], idle_tokens: int | None = None,
                 lookup_tokens: int = 0, lookup_budget: int = 16, packed: bool = False,
                 drafter: Drafter | None = None,
                 pin_tokens: int | None = None, mixed_prefill: int | None = None,
                 prefix_wait: int = 64, lane: PrefillLane | None = None) -> None:
        self.runner = runner
        # Long prompts computed on threads of their own while others decode (engine.lane).
        self.lane = lane
        # While any sequence decodes, a step carries at most mixed_prefill prompt tokens (None:
        # the whole step budget), so a long prompt cannot stall the decoders for a whole
        # chunk; with nothing decoding, prompts get the whole budget.
        self.mixed_prefill = mixed_prefill
        # A waiting request whose prompt shares at least prefix_wait more tokens with a prompt
        # still being computed than that computation has reached waits for it and then copies
        # the prefix, instead of computing the same tokens alongside (0: never waits).
        self.prefix_wait = prefix_wait
        # Prompt-lookup speculation: at most lookup_tokens drafted per sequence and
        # lookup_budget per step (0: off). Verifying a draft costs batch rows, so the step
        # budget keeps a full batch of decoders from paying for many guesses at once.
        self.lookup_tokens = lookup_tokens
        self.lookup_budget = lookup_budget
        # Draft-model speculation (engine.draft_model): guesses for the sequences prompt
        # lookup has none for, within the same per-step budget, verified the same way.
        self.drafter = drafter
        # Sessions may pin the cache slots, never the slots running sequences need.
        self.pool = SlotPool(n_slots, runner, idle_tokens=idle_tokens, packed=packed,
                             max_pinned=n_slots - max_running, pin_tokens=pin_tokens)
        self.adapters = AdapterRotation()  # one LoRA group per step (adapters are per context)
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.sink = sink
        self.waiting = WaitQueue()  # admission order: priority, fair share, arrival
        self.running: list[Sequence] = []
        self.stats = StepStats()
        self.scorer = LogprobScorer(runner)
        self._outputs: dict[EngineRequest, list[TokenOutput]] = {}
        # Set when the KV pool ran out: no admission until a sequence finishes, or a
        # preempted sequence would be readmitted at once and fail the next step again.
        self._kv_pressure = False
        self._draft_time = 0.0  # this step's drafting, counted apart from scheduling
        # requests counted as waiting for an in-flight prefix (weak: an abort forgets them)
        self._held: weakref.WeakSet[EngineRequest] = weakref.WeakSet()
        # this step's rows per sequence, for the drafter: (seq, first row, position, tokens)
        self._rows: list[tuple[Sequence, int, int, list[int]]] = []

    # -- requests in and out ----------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        request.sequences = [Sequence.for_request(request, i) for i in range(request.n)]
        self.waiting.add(request)

    def abort(self, request_id: str) -> bool:
        found = False
        for seq in [*self.running, *self.waiting]:
            if seq.request.request_id == request_id and not seq.finished:
                self._finish(seq, FINISH_CANCELLED, "")
                found = True
        self._flush_outputs()
        return found

    def stop_choice(self, request_id: str, index: int) -> bool:
        """End one choice now, as a stop: what it wrote ended the turn (chat.callgate)."""
        for seq in [*self.running, *self.waiting]:
            if seq.request.request_id == request_id and seq.index == index \
                    and not seq.finished:
                self._finish(seq, FINISH_STOP, "")
                self._flush_outputs()
                return True
        return False

    def unpin(self, session: str) -> bool:
        """End a session's KV pin (prefix_cache.py); its running or queued turns no longer pin
        when they end. False: it held no pinned slot."""
        for seq in [*self.running, *self.waiting]:
            if seq.request.pin == session:
                seq.request.pin = None
        return self.pool.unpin(session)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step; False when nothing could run (so the caller may wait)."""
        t0 = time.perf_counter()
        self._admit()
        imaged = self._media_step()
        self._lane_step()
        plan = self._plan()
        t1 = time.perf_counter()
        drafting, self._draft_time = self._draft_time, 0.0
        self.stats.draft += drafting
        t0 += drafting  # the draft model's time is its own phase, not scheduling's
        if self.lane is not None:  # idle: the lane may use every thread; else wait for them
            self.lane.main_active(bool(plan))
            t1 = time.perf_counter()
        if not plan:
            self.stats.schedule += t1 - t0
            self._flush_outputs()
            return imaged or self.lane is not None and self.lane.job is not None \
                and self.lane.job.done
        sample_at = self._build_batch(plan)
        t2 = time.perf_counter()
        self.adapters.apply(self.runner)
        status = self.runner.decode(self.runner.batch)
        t3 = time.perf_counter()
        if status != DECODE_OK:
            self._recover(status, plan)
        else:
            if self.drafter is not None:
                t_obs = time.perf_counter()
                self.drafter.observe(self._rows)
                self._draft_time += time.perf_counter() - t_obs
            self.stats.prompt_tokens += sum(n for seq, n in plan if seq.n_computed < seq.n_prompt)
            for seq, n in plan:
                seq.n_computed += n
            self.scorer.score_prompts()
            tokens = self._sample(sample_at)
            t4 = time.perf_counter()
            self._postprocess(tokens)
            t5 = time.perf_counter()
            self.stats.sample += t4 - t3
            self.stats.detokenize += t5 - t4
        self.stats.steps += 1
        self.stats.schedule += t1 - t0
        self.stats.batch_build += t2 - t1
        self.stats.decode += t3 - t2
        self.stats.batch_tokens += self.runner.batch.n
        self.stats.last_step_sequences = len(plan)
        self._flush_outputs()
        return True

    def _admit(self) -> None:
        if self._kv_pressure and any(s.state is SeqState.RUNNING for s in self.running):
            return
        self._kv_pressure = False
        i = 0  # the waiting sequences before i wait for a stored prefix to be read (deferred)
        deferred: EngineRequest | None = None
        held: set[EngineRequest] = set()  # waiting for a prefix another sequence computes
        while i < len(self.waiting) and len(self.running) < self.max_running:
            seq = self.waiting[i]
            if seq.request is deferred or seq.request in held:
                i += 1  # its n > 1 siblings wait with it
                continue
            if self._awaits_prefix(seq):
                held.add(seq.request)  # admitted once the shared prefix is computed
                if seq.request not in self._held:
                    self._held.add(seq.request)
                    self.stats.prefix_waits += 1
                i += 1
                continue
            siblings = self._unforked_siblings(seq)
            if len(self.running) + 1 + len(siblings) > self.max_running:
                break
            if self.pool.n_free < 1 + len(siblings):
                break
            placement = self.pool.place(seq)
            if placement is None:
                if not self.pool.deferred or deferred is not None:
                    break  # no room; or a second read under way: no more than two at a time
                deferred, i = seq.request, i + 1  # the ones behind it need not wait for the disk
                continue
            del self.waiting[i]
            self._held.discard(seq.request)
            first_admission = seq.sampler is None
            seq.slot, seq.n_computed = placement.slot, placement.n_reused
            if seq.request.media:  # reused KV never ends inside an image
                seq.n_computed = media.whole(seq.request.media, placement.n_reused)
                if seq.n_computed < placement.n_reused:
                    self.runner.seq_rm(placement.slot.seq_id, seq.n_computed, -1)
            seq.state = SeqState.RUNNING
            if first_admission:
                seq.n_cached = placement.n_reused
                seq.sampler = self._sampler_for(seq)
                seq.admitted_at = time.monotonic()
                if seq.index == 0 and log.isEnabledFor(logging.DEBUG):
                    request = seq.request
                    log.debug("admitted %s: %d prompt tokens, %d cached, queued %.1f ms",
                              request.request_id, seq.n_prompt, seq.n_cached,
                              (seq.admitted_at - request.arrival) * 1000,
                              extra={"request_id": request.correlation_id})
            self.running.append(seq)
            for sib in siblings:  # n > 1: siblings fork the first choice's prompt KV later
                self.waiting.remove(sib)
                if sib.admitted_at is None:
                    sib.admitted_at = time.monotonic()
                sib.slot = self.pool.reserve(sib)
                sib.sampler = self._sampler_for(sib)
                sib.state = SeqState.FORK_WAIT
                self.running.append(sib)

    def _awaits_prefix(self, seq: Sequence) -> bool:
        """Whether `seq` should wait for a running sequence that is computing a prompt prefix
        it shares: prefix_wait tokens or more of it still to compute, and no idle slot that
        holds nearly as much of it already."""
        if not self.prefix_wait or seq.request.media or seq.n_output:
            return False
        tokens = seq.tokens[: seq.reuse_limit]
        adapters = seq.request.adapters
        shared = 0
        for other in self.running:
            if other.n_computed >= other.n_prompt or other.slot is None \
                    or other.slot.adapters != adapters:
                continue
            n = common_prefix_len(other.tokens[: other.n_prompt], tokens)
            if n - other.n_computed >= self.prefix_wait:
                shared = max(shared, n)
        if not shared:
            return False
        return not any(not slot.busy and slot.adapters == adapters and
                       common_prefix_len(slot.cached, tokens) + self.prefix_wait > shared
                       for slot in self.pool.slots)

    @staticmethod
    def _unforked_siblings(seq: Sequence) -> list[Sequence]:
        if seq.index != 0 or seq.n_output:
            return []
        return [s for s in seq.request.sequences[1:]
                if s.state is SeqState.WAITING and s.sampler is None]

    def _sampler_for(self, seq: Sequence) -> SamplerLike:
        banned = self.runner.eog_tokens if seq.request.ignore_eos else ()
        return self.runner.make_sampler(seq.request.sampling, seq.seed, banned)

    def _lane_step(self) -> None:
        """Take back the lane's finished prompt; hand it the next long prompt while other
        sequences decode (with nothing decoding, the engine's context computes it on every
        thread at once)."""
        lane = self.lane
        if lane is None:
            return
        tokens = lane.collect()
        if tokens:
            self.stats.lane_jobs += 1
            self.stats.lane_tokens += tokens
            self.stats.prompt_tokens += tokens
        if lane.job is not None:
            return
        running = [s for s in self.running if s.state is SeqState.RUNNING]
        if not any(s.n_pending == 1 for s in running):
            return
        for seq in running:
            if seq.slot is not None and lane.takes(seq):
                lane.start(seq)
                return

    def _plan(self) -> list[tuple[Sequence, int]]:
        """Decode tokens first (one per decoding sequence), then prompt chunks within budget."""
        running = [s for s in self.running if s.state is SeqState.RUNNING and s.lane_job is None]
        lane = self.lane
        if lane is not None and lane.job is not None and \
                any(s.n_pending == 1 for s in running):
            # a long prompt waits for the lane rather than stall the decoders here
            running = [s for s in running if s.n_pending == 1 or not lane.takes(s)]
        active = self.adapters.select(running)
        decoding = [s for s in active if s.n_pending == 1]
        plan = [(s, 1) for s in decoding]
        budget = self.step_tokens - len(plan)
        if decoding and self.mixed_prefill is not None:
            budget = min(budget, self.mixed_prefill if lane is None
                         else lane.mixed_cap(self.mixed_prefill))
        for seq in active:
            if seq.n_pending > 1 and budget > 0:
                n = min(seq.n_pending, budget)
                if seq.request.media:  # text up to the next image (media steps run those)
                    n = media.text_room(seq.request.media, seq.n_computed, n)
                    if n == 0:
                        continue
                if seq.scoring_prompt:  # every row has logits: bound llama.cpp's output buffer
                    n = min(n, self.scorer.prompt_chunk)
                plan.append((seq, n))
                budget -= n
        if (self.lookup_tokens or self.drafter is not None) and decoding and budget > 0:
            drafted = self._draft(decoding, min(budget, self.lookup_budget))
            if drafted:
                plan = [(s, n + len(s.draft)) for s, n in plan]
        return plan

    def _draft(self, decoding: list[Sequence], budget: int) -> bool:
        """Give decoding sequences prompt-lookup drafts, else draft-model ones, within
        `budget` tokens in all."""
        drafted = False
        wanted: list[tuple[Sequence, int]] = []  # (sequence, most tokens) for the draft model
        for seq in decoding:
            if budget <= 0:
                break
            request = seq.request
            if seq.n_output == 0 or request.logprobs is not None \
                    or request.prompt_scores is not None or request.media:
                # fresh siblings fork this KV; logprobs are reported token by token; an
                # image's stand-in ids are no tokens to propose
                continue
            room = min(budget, request.max_tokens - seq.n_output - 1,
                       self.runner.n_ctx - len(seq.tokens) - 1)
            if self.lookup_tokens:
                if seq.lookup is None:
                    seq.lookup, seq.draft_len = NgramIndex(), DraftLength(self.lookup_tokens)
                assert seq.draft_len is not None
                seq.draft = seq.lookup.draft(seq.tokens, min(seq.draft_len.current, room))
                if not seq.draft:
                    seq.draft_len.skipped()
                budget -= len(seq.draft)
                drafted = drafted or bool(seq.draft)
                if seq.draft:
                    continue
            if self.drafter is not None:
                if seq.model_len is None:
                    seq.model_len = self.drafter.length()
                limit = min(seq.model_len.current, room)
                if limit > 0:
                    wanted.append((seq, limit))
                    budget -= limit
                else:
                    seq.model_len.skipped()
        if wanted:
            assert self.drafter is not None
            t0 = time.perf_counter()
            drafts = self.drafter.draft(wanted)
            self._draft_time += time.perf_counter() - t0
            for seq, _ in wanted:
                seq.draft = drafts.get(seq, [])
                seq.drafted_by_model = bool(seq.draft)
                drafted = drafted or bool(seq.draft)
        return drafted

    def _media_step(self) -> bool:
        """Decode one image into the KV of the first running sequence that stands at one, in
        its own llama.cpp calls before this step's batch: decoding sequences wait for at most
        one image per step. False when no sequence stands at an image."""
        for seq in self.running:
            spans = seq.request.media
            span = media.span_at(spans, seq.n_computed) if spans else None
            if span is None or seq.state is not SeqState.RUNNING or seq.slot is None:
                continue
            status, hit = self.runner.decode_media(span, seq.slot.seq_id)
            if status == DECODE_OK:
                seq.n_computed = span.end
                self.stats.prompt_tokens += span.n_tokens
                self.stats.media_chunks += 1
                self.stats.media_tokens += span.n_tokens
                self.stats.media_cache_hits += hit
                return True
            self.runner.seq_rm(seq.slot.seq_id, span.start, -1)  # no half image stays
            if status == DECODE_NO_KV_SLOT and self.pool.evict_lru_idle():
                return True  # tried again at the next step
            self._finish(seq, FINISH_ERROR, "", error=f"decoding an image failed (status "
                         f"{status}); the context may be full", error_kind=ErrorKind.CAPACITY
                         if status == DECODE_NO_KV_SLOT else ErrorKind.INTERNAL)
            return True
        return False

    def _build_batch(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        batch = self.runner.batch
        batch.clear()
        self.scorer.reset()
        sample_at = []
        rows = self._rows = []
        # Rows by ascending sequence id: with split KV, llama.cpp only puts consecutive ids
        # in one micro-batch (prefix_cache.py), and the order means nothing otherwise.
        for seq, n in sorted(plan, key=lambda item: item[0].slot.seq_id):  # type: ignore[union-attr]
            start = seq.n_computed
            assert seq.slot is not None
            if seq.draft:  # the pending token, then the guesses: logits on every row
                tokens = [seq.tokens[start], *seq.draft]
                idx = batch.add(tokens, start, seq.slot.seq_id, True)
                rows.append((seq, idx + 1 - len(tokens), start, tokens))
                batch.request_logits(idx - len(seq.draft), idx + 1)
                sample_at.append((seq, idx - len(seq.draft)))
                continue
            completes = start + n == len(seq.tokens)
            tokens = seq.tokens[start:start + n]
            idx = batch.add(tokens, start, seq.slot.seq_id, completes)
            rows.append((seq, idx + 1 - n, start, tokens))
            if completes:
                sample_at.append((seq, idx))
            if seq.scoring_prompt:
                self.scorer.mark_prompt_rows(batch, seq, start, n, idx - n + 1)
        return sample_at

    def _sample(self, sample_at: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        sampled: list[tuple[Sequence, int]] = []
        for seq, idx in sample_at:
            if seq.draft:
                sampled.extend((seq, token) for token in self._verify(seq, idx))
                continue
            sampled.append((seq, self._sample_one(seq, idx)))
            if seq.n_output == 0:
                for sib in self._fork_siblings(seq):
                    sampled.append((sib, self._sample_one(sib, idx)))
        return sampled

    def _verify(self, seq: Sequence, first_row: int) -> list[int]:
        """Sample row by row while the sampler agrees with the draft. Each token is drawn
        from the model's distribution given the tokens actually kept, which is exactly what
        plain decoding would draw, so output is unchanged (greedy) or correctly distributed
        (sampling, with the same random draws per token). Rejected guesses leave the KV."""
        draft, seq.draft = seq.draft, []
        tokens: list[int] = []
        for i in range(len(draft) + 1):
            token = self._sample_one(seq, first_row + i)
            tokens.append(token)
            if i == len(draft) or token != draft[i]:
                break
        accepted = len(tokens) - 1
        rejected = len(draft) - accepted
        if rejected:
            assert seq.slot is not None
            seq.n_computed -= rejected
            self.runner.seq_rm(seq.slot.seq_id, seq.n_computed, -1)
        self.stats.draft_steps += 1
        if seq.drafted_by_model:
            seq.drafted_by_model = False
            assert seq.model_len is not None
            seq.model_len.update(len(draft), accepted)
            self.stats.model_draft_tokens += len(draft)
            self.stats.model_accepted_tokens += accepted
            return tokens
        assert seq.draft_len is not None
        seq.draft_len.update(len(draft), accepted)
        self.stats.draft_tokens += len(draft)
        self.stats.accepted_tokens += accepted
        return tokens

    def _sample_one(self, seq: Sequence, idx: int) -> int:
        assert seq.sampler is not None
        token = seq.sampler.sample(self.runner, idx)
        if seq.request.logprobs is not None:
            self.scorer.sampled(seq, idx, token)
        return token

    def _fork_siblings(self, seq: Sequence) -> list[Sequence]:
        forked = []
        for sib in seq.request.sequences:
            if sib.state is SeqState.FORK_WAIT and sib.slot is not None and seq.slot is not None:
                self.runner.seq_cp(seq.slot.seq_id, sib.slot.seq_id, 0, seq.n_computed)
                sib.n_computed, sib.n_cached = seq.n_computed, seq.n_cached
                sib.state = SeqState.RUNNING
                forked.append(sib)
        return forked

    def _postprocess(self, sampled: list[tuple[Sequence, int]]) -> None:
        now = time.monotonic()
        for seq, token in sampled:
            if seq.finished:  # a verified draft ran past the end of its sequence
                continue
            seq.tokens.append(token)
            self.stats.generated_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            elif seq.last_token_at is not None:
                seq.token_gaps.append(now - seq.last_token_at)
            seq.last_token_at = now
            self._on_token(seq, token)

    def _on_token(self, seq: Sequence, token: int) -> None:
        request = seq.request
        eog = token in self.runner.eog_tokens and not request.ignore_eos
        if token in request.stop_token_ids or eog:
            self._finish(seq, FINISH_STOP, "", token=token,
                         stop_match=None if token not in request.stop_token_ids else str(token))
            return
        piece = self.runner.token_bytes(token) if token in request.render_special \
            else self.runner.piece(token)
        text, matched = seq.stops.push(seq.decoder.push(piece))
        if matched is not None:
            self._finish(seq, FINISH_STOP, text, token=token, stop_match=matched, flush=False)
        elif seq.n_output >= request.max_tokens or len(seq.tokens) >= self.runner.n_ctx:
            self._finish(seq, FINISH_LENGTH, text, token=token)
        else:
            self._emit(seq, seq.output(text, token))

    def _finish(self, seq: Sequence, reason: str, text: str, *, token: int | None = None,
                stop_match: str | None = None, flush: bool = True, error: str | None = None,
                error_kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        if flush:
            tail, matched = seq.stops.push(seq.decoder.flush())
            text += tail
            if matched is not None:
                stop_match, reason = matched, FINISH_STOP
            else:
                text += seq.stops.flush()
        out = seq.output(text, token)
        out.finish_reason, out.stop_match, out.error = reason, stop_match, error
        if reason == FINISH_ERROR:
            out.error_kind = error_kind
        out.usage = seq.usage()
        seq.finish_reason, seq.state = reason, SeqState.FINISHED
        seq.finished_at = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("finished %s choice %d: %s, %d output tokens", seq.request.request_id,
                      seq.index, reason, seq.n_output,
                      extra={"request_id": seq.request.correlation_id})
        if seq.slot is not None and seq.n_computed > len(seq.tokens):
            # Accepted guesses past a stop: their KV is not part of the kept conversation.
            seq.n_computed = len(seq.tokens)
            self.runner.seq_rm(seq.slot.seq_id, seq.n_computed, -1)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if self.drafter is not None:
            self.drafter.forget(seq)
        seq.lane_job = None  # the lane drops what it computes for it
        if seq.slot is not None:
            self.pool.release(seq.slot, keep=reason != FINISH_ERROR)
            seq.slot = None
            self._kv_pressure = False
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None
        self._emit(seq, out)

    def _emit(self, seq: Sequence, out: TokenOutput) -> None:
        self._outputs.setdefault(seq.request, []).append(out)

    def _flush_outputs(self) -> None:
        if self._outputs:
            outputs, self._outputs = list(self._outputs.items()), {}
            self.sink(outputs)

    # -- failures ---------------------------------------------------------------------------
    def _recover(self, status: int, plan: list[tuple[Sequence, int]]) -> None:
        """No KV room: drop idle prefixes, then preempt the newest sequence; else fail."""
        self.stats.decode_failures += 1
        for seq, _ in plan:
            seq.draft = []  # guesses are re-proposed, if still apt, at the next step
            seq.drafted_by_model = False
        if status == DECODE_NO_KV_SLOT:
            if self.pool.evict_lru_idle():
                return
            running = [s for s in self.running if s.state is SeqState.RUNNING]
            if len(running) > 1:
                self._preempt(max(running, key=lambda s: (s.request.arrival, s.index)))
                return
        if status == DECODE_NO_KV_SLOT:  # a capacity limit, not a fault: retrying may succeed
            message = "the model's context (KV cache) is full; retry shortly"
            kind = ErrorKind.CAPACITY
        else:
            message, kind = f"llama_decode failed with status {status}", ErrorKind.INTERNAL
        for seq, _ in plan:
            self._finish(seq, FINISH_ERROR, "", error=message, error_kind=kind)

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's KV and requeue it at the front; it recomputes prompt + output."""
        self.stats.preemptions += 1
        self._kv_pressure = True
        log.info("preempted %s choice %d for lack of KV room; it will be recomputed",
                 seq.request.request_id, seq.index,
                 extra={"request_id": seq.request.correlation_id})
        assert seq.slot is not None
        self.pool.release(seq.slot, keep=False)
        if self.drafter is not None:
            self.drafter.forget(seq)
        seq.slot, seq.n_computed, seq.state = None, 0, SeqState.WAITING
        seq.lane_job = None
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def fail_all(self, message: str, kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        """End every running and waiting sequence with an error of this kind (a crash, or
        the drain timeout of a server shutting down: ErrorKind.DRAINING)."""
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, FINISH_ERROR, "", error=message, error_kind=kind)
        self._flush_outputs()
