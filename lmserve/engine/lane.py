"""The prefill lane: a long prompt computed in a second llama.cpp context over the same weights,
on threads of its own, while the engine's context goes on decoding the other sequences.

On a CPU a prompt token costs about what a decoded token costs, so a prompt chunk riding in a
decoding step makes that step, and every decoder's inter-token gap, as long as the chunk:
`--mixed-prefill` bounds the chunk, but below about 64 tokens llama.cpp's matrix kernels cost
more per token, so the bound cannot go low without slowing the prompt
(benchmarks/mixed_step_cost.py). The lane instead splits the threads: the engine's context
decodes on `threads - lane_threads` of them while the side context computes the prompt in
chunks on the other `lane_threads`, in this module's worker thread (ctypes lets go of the GIL
inside llama_decode). The decoders' steps stay decode-only, and the prompt's cost per token
stays that of large chunks.

A job: the sequence's KV so far (its reused prefix) is copied into the side context, the
worker computes its prompt up to, not including, the last token, and the engine copies the
result back into the sequence's own slot (kv_state's envelope carries it between the two
layouts) and computes the last token itself, whose logits give the first output token. While
the engine's context has nothing to run, the worker takes all the threads for its next chunk
(smaller then, so the engine never waits long for them back).

CPU only: on a GPU prompt chunks are cheap beside decoding and the device is one, so the
service turns the lane off (`--prefill-lane 0`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmserve.engine.prefix_cache import Slot
from lmserve.engine.sequence import SeqState, Sequence

log = logging.getLogger("lmserve.engine")


class LaneContext(Protocol):
    """What the lane needs of a llama.cpp context (runner.Context)."""

    n_ctx: int
    n_batch: int
    @property
    def batch(self) -> Any: ...  # runner.Batch: clear(), add(tokens, pos, seq_id, logits)
    def decode(self, batch: Any) -> int: ...
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def state_seq_get(self, seq_id: int) -> bytearray: ...
    def state_seq_set(self, seq_id: int, data: bytearray) -> int: ...
    def set_threads(self, n: int) -> None: ...


@dataclass(eq=False)
class LaneJob:
    seq: Sequence
    slot: Slot
    start: int  # positions the sequence's slot held when the job began
    end: int  # positions the job computes up to (the prompt less its last token)
    prefix: bytearray | None  # the slot's KV at the start, for the side context
    state: bytearray | None = None  # the side context's KV at the end
    error: str | None = None
    done: bool = False
    started_at: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # the worker's time on it


@dataclass
class LaneStats:
    jobs: int = 0
    tokens: int = 0  # prompt tokens the lane computed and the engine took
    seconds: float = 0.0  # the worker's time computing them
    dropped: int = 0  # jobs whose sequence ended or moved before they were done
    failed: int = 0  # jobs the side context could not compute or the engine could not load


class PrefillLane:
    """One job at a time. Every method but the worker's runs on the engine thread."""

    SIDE_SEQ = 0

    def __init__(self, side: LaneContext, main: LaneContext, *, threads: int,
                 lane_threads: int, min_tokens: int, chunk: int = 256,
                 boost_chunk: int = 128) -> None:
        if not 0 < lane_threads < threads:
            raise ValueError(f"a prefill lane of {lane_threads} threads needs more than "
                             f"{lane_threads} threads in all ({threads})")
        self.side, self.main = side, main
        self.threads, self.lane_threads = threads, lane_threads
        self.min_tokens = min_tokens
        self.chunk = min(chunk, side.n_batch)
        self.boost_chunk = min(boost_chunk, side.n_batch)
        self.stats = LaneStats()
        self.job: LaneJob | None = None  # handed to the worker and not yet collected
        self._cond = threading.Condition()
        self._todo: LaneJob | None = None
        self._main_active = True  # the engine's context has work: the lane keeps to its share
        self._boosted = False  # the worker is computing a chunk on all the threads
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the engine's side --------------------------------------------------------------------
    def takes(self, seq: Sequence) -> bool:
        """Whether `seq`'s prompt is the lane's kind of work: long enough, within the side
        context's room, text only, no prompt logprobs, no LoRA (the side context has none)."""
        request = seq.request
        end = len(seq.tokens) - 1
        return (end - seq.n_computed >= self.min_tokens and end <= self.side.n_ctx
                and not request.media and request.prompt_scores is None
                and not request.adapters and seq.n_output == 0)

    def mixed_cap(self, cap: int) -> int:
        """The prompt tokens a decoding step may carry while a job runs: the engine's context
        has only its share of the threads, so its steps' chunks shrink by that share, or a
        step would take as long as a whole chunk on every thread; not below 65, where
        llama.cpp's CPU matrix kernels turn slower per token (benchmarks/mixed_step_cost.py)."""
        if self.job is None:
            return cap
        return max(65, cap * (self.threads - self.lane_threads) // self.threads)

    def start(self, seq: Sequence) -> LaneJob:
        assert self.job is None and seq.slot is not None
        seq_id = seq.slot.seq_id
        prefix = self.main.state_seq_get(seq_id) if seq.n_computed else None
        job = LaneJob(seq=seq, slot=seq.slot, start=seq.n_computed,
                      end=len(seq.tokens) - 1, prefix=prefix)
        seq.lane_job = job
        self.job = job
        self.main.set_threads(self.threads - self.lane_threads)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmserve-prefill-lane",
                                            daemon=True)
            self._thread.start()
        with self._cond:
            self._todo = job
            self._cond.notify_all()
        return job

    def collect(self) -> int:
        """Once the worker is done with the job: its KV loaded into the sequence's slot and
        n_computed moved on; the prompt tokens it loaded (0: none, or no job done). A sequence
        that ended or lost its slot meanwhile is not touched."""
        job = self.job
        if job is None or not job.done:
            return 0
        self.job = None
        self.main.set_threads(self.threads)
        seq = job.seq
        if seq.lane_job is not job or seq.slot is not job.slot \
                or seq.state is not SeqState.RUNNING:
            self.stats.dropped += 1
            return 0
        seq.lane_job = None
        if job.error is not None or job.state is None:
            self.stats.failed += 1
            log.warning("the prefill lane could not compute %s's prompt (%s); the engine "
                        "computes it", seq.request.request_id, job.error)
            return 0  # the slot still holds what it held at the start
        if not self.main.state_seq_set(job.slot.seq_id, job.state):
            self.stats.failed += 1
            seq.n_computed = 0  # a refused state leaves the sequence empty
            log.warning("the engine's context refused the prefill lane's KV for %s; it "
                        "computes the prompt", seq.request.request_id)
            return 0
        seq.n_computed = job.end
        self.stats.jobs += 1
        self.stats.tokens += job.end - job.start
        self.stats.seconds += job.seconds
        return job.end - job.start

    def main_active(self, active: bool) -> None:
        """Whether the engine's context is about to run a step (True) or has nothing to run
        (False). Before a step, wait for a chunk the worker runs on all the threads."""
        with self._cond:
            self._main_active = active
            if active:
                while self._boosted:
                    self._cond.wait()
            else:
                self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> bool:
        """Stop the worker (it ends its job at the next chunk); False when it is still
        computing one after `timeout` (its side context must then stay allocated)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._todo is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, self._todo = self._todo, None
            assert job is not None
            t0 = time.perf_counter()
            try:
                self._compute(job)
            except Exception as exc:  # the engine computes the prompt itself
                job.error = f"{type(exc).__name__}: {exc}"
            job.seconds = time.perf_counter() - t0
            job.prefix = None
            job.done = True

    def _compute(self, job: LaneJob) -> None:
        side, seq = self.side, self.SIDE_SEQ
        side.seq_rm(seq, -1, -1)
        if job.prefix is not None and not side.state_seq_set(seq, job.prefix):
            raise RuntimeError("the side context refused the sequence's prefix")
        tokens = job.seq.tokens
        pos = job.start
        while pos < job.end:
            if job.seq.lane_job is not job or self._closed:  # it ended, or the lane did
                side.seq_rm(seq, -1, -1)
                return
            with self._cond:
                boost = not self._main_active
                self._boosted = boost
            try:
                side.set_threads(self.threads if boost else self.lane_threads)
                n = min(self.boost_chunk if boost else self.chunk, job.end - pos)
                batch = side.batch
                batch.clear()
                batch.add(tokens[pos:pos + n], pos, seq, False)
                status = side.decode(batch)
            finally:
                if boost:
                    with self._cond:
                        self._boosted = False
                        self._cond.notify_all()
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            pos += n
        job.state = side.state_seq_get(seq)
        side.seq_rm(seq, -1, -1)
