"""One request's mutable state inside the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lmserve.core.events import TokenLogprob, TokenOutput, Usage
from lmserve.core.images import MediaSpan
from lmserve.core.observe import RequestTiming
from lmserve.core.request import SamplingParams
from lmserve.engine.detokenizer import IncrementalDecoder, StopMatcher

if TYPE_CHECKING:
    from lmserve.engine.lookup import DraftLength, NgramIndex
    from lmserve.engine.prefix_cache import Slot

_ids = itertools.count()


class SamplerLike(Protocol):
    """A sequence's sampler, made by the runner (runner.Sampler, or a test fake). `ctx` is the
    runner that made it, which each sampler reads in its own way (runner.Sampler needs the
    llama.cpp context); the protocols cannot tie the two together, hence Any."""

    def sample(self, ctx: Any, batch_index: int) -> int: ...
    def free(self) -> None: ...


@dataclass(eq=False)
class EngineRequest:
    """What the service submits: token ids plus everything that decides when to stop."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    handle: object = None  # the submitter's own reference, returned with each step's outputs
    sequences: list[Sequence] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: sampled token's logprob + top k alternatives
    prompt_logprobs: int | None = None  # the same for prompt tokens
    # Prompt logprobs computed so far, shared by the n choices (computed once, by choice 0).
    prompt_scores: list[TokenLogprob] | None = None
    # LoRA adapters as ((path, scale), ...): KV computed under one set is useless to another,
    # so prefix reuse, the disk cache and batching all key on it. () = the base model.
    adapters: tuple[tuple[str, float], ...] = ()
    # Control tokens rendered as their text (markers a tool or reasoning parser reads).
    render_special: frozenset[int] = frozenset()
    # Admission (engine.admission): lower priority values are admitted first; waiting
    # requests of different callers take turns. None: the shared class of unnamed callers.
    priority: int = 0
    caller: str | None = None
    dequeued: bool = False  # left the wait queue once (its prompt no longer counts as queued)
    # The HTTP request's correlation id (X-Request-Id), for the engine's log lines about it.
    correlation_id: str | None = None
    # The prompt's images: their stand-in positions in prompt_tokens (core.images, runner).
    media: tuple[MediaSpan, ...] = ()
    # The session whose KV this request's slot stays pinned to when it ends (prefix_cache.py).
    pin: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_logprobs is not None and self.prompt_scores is None:
            self.prompt_scores = []

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.finished for s in self.sequences)

    def timing(self) -> RequestTiming:
        """Where the request is in its life (read from the event loop while the engine thread
        writes: each field has one writer, and a reading a step old is fine)."""
        seqs = list(self.sequences)
        admitted = [s.admitted_at for s in seqs if s.admitted_at is not None]
        first = [s.first_token_at for s in seqs if s.first_token_at is not None]
        ends = [s.finished_at for s in seqs]
        return RequestTiming(
            queued_at=self.arrival, admitted_at=min(admitted) if admitted else None,
            first_token_at=min(first) if first else None,
            finished_at=max(e for e in ends if e is not None) if seqs and None not in ends
            else None,
            prompt_tokens=len(self.prompt_tokens),
            output_tokens=sum(s.n_output for s in seqs),
            cached_tokens=seqs[0].n_cached if seqs else 0,
            token_gaps=tuple(g for s in seqs for g in list(s.token_gaps)))


class SeqState(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    RUNNING = "running"  # holds a slot; prefilling or decoding
    FORK_WAIT = "fork_wait"  # n>1 sibling waiting for the first choice's prompt KV
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A single choice. `tokens` is prompt + output; the KV holds tokens[:n_computed]."""

    request: EngineRequest
    index: int
    tokens: list[int]
    stops: StopMatcher
    n_prompt: int
    state: SeqState = SeqState.WAITING
    slot: Slot | None = None
    sampler: SamplerLike | None = None
    n_computed: int = 0
    n_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    decoder: IncrementalDecoder = field(default_factory=IncrementalDecoder)
    finish_reason: str | None = None
    admitted_at: float | None = None  # time.monotonic() of the first admission
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # seconds between output tokens
    sampled_logprob: TokenLogprob | None = None  # this step's token, until output() takes it
    prompt_scores_sent: bool = False
    lookup: NgramIndex | None = None  # prompt-lookup speculation, made on the first draft
    draft_len: DraftLength | None = None
    draft: list[int] = field(default_factory=list)  # this step's guesses, until verified
    model_len: DraftLength | None = None  # draft-model speculation (engine.draft_model)
    drafted_by_model: bool = False  # this step's guesses came from the draft model
    lane_job: object | None = None  # the prefill lane computes its prompt (engine.lane)

    @classmethod
    def for_request(cls, request: EngineRequest, index: int) -> Sequence:
        return cls(request=request, index=index, tokens=list(request.prompt_tokens),
                   stops=StopMatcher(request.stop), n_prompt=len(request.prompt_tokens))

    @property
    def n_output(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def n_pending(self) -> int:
        """Tokens still to feed before the next logits are available."""
        return len(self.tokens) - self.n_computed

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs are asked for and not all computed yet."""
        scores = self.request.prompt_scores
        return scores is not None and len(scores) < self.n_prompt

    @property
    def reuse_limit(self) -> int:
        """How many leading tokens the prefix cache may supply. Never the last one (its logits
        are sampled), and while prompt logprobs are pending, nothing past the position before
        the first unscored token (the logits there score it, and reused tokens have none)."""
        limit = len(self.tokens) - 1
        if self.scoring_prompt:
            assert self.request.prompt_scores is not None
            limit = min(limit, max(len(self.request.prompt_scores) - 1, 0))
        return limit

    @property
    def finished(self) -> bool:
        return self.state is SeqState.FINISHED

    @property
    def seed(self) -> int:
        base = self.request.sampling.seed
        if base is None:
            return (hash(self.request.request_id) + self.index) & 0xFFFFFFFF
        return base + self.index

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.n_prompt, completion_tokens=self.n_output,
                     cached_tokens=self.n_cached)

    def output(self, text: str, token: int | None) -> TokenOutput:
        out = TokenOutput(index=self.index, text=text,
                          token_ids=[token] if token is not None else [])
        if self.request.logprobs is not None or self.request.prompt_scores is not None:
            self._attach_logprobs(out)
        return out

    def _attach_logprobs(self, out: TokenOutput) -> None:
        if self.sampled_logprob is not None and out.token_ids:
            out.logprobs, self.sampled_logprob = [self.sampled_logprob], None
        elif self.request.logprobs is not None:
            out.logprobs = []
        if self.request.prompt_scores is not None and not self.prompt_scores_sent:
            out.prompt_logprobs, self.prompt_scores_sent = self.request.prompt_scores, True
