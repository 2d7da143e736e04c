"""The prefill lane (engine.lane) under the scheduler, with fake contexts: which prompts go to
it, that decoders' steps never carry their chunks, the KV it hands back, cancellation, and the
threads each side runs on."""

from __future__ import annotations

import json
import threading
import time

from lmserve.core.request import SamplingParams
from lmserve.engine.lane import PrefillLane
from lmserve.engine.sequence import EngineRequest
from tests.unit.engine.test_scheduler import Harness, prompt
from tests.unit.fakes import FakeBatch, FakeRunner, reference_output

THREADS, LANE_THREADS, MIN_TOKENS = 4, 2, 24


def _state(cells: list[int]) -> bytearray:
    return bytearray(json.dumps(cells).encode())


class StatefulRunner(FakeRunner):
    """The engine's context, with sequence states and a thread count."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.n_batch = self.batch.capacity
        self.threads: list[int] = []  # every set_threads, in order
        self.sets: list[int] = []  # sequences a state was loaded into

    def set_threads(self, n: int) -> None:
        self.threads.append(n)

    def state_seq_get(self, seq_id: int) -> bytearray:
        return _state(self.kv.get(seq_id, []))

    def state_seq_set(self, seq_id: int, data: bytearray) -> int:
        self.kv[seq_id] = json.loads(bytes(data))
        self.sets.append(seq_id)
        return len(data)


class SideContext(StatefulRunner):
    """The lane's context: with `hold()`, each decode waits for a `release()`."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.gate: threading.Semaphore | None = None
        self.chunks: list[int] = []  # tokens per decode

    def hold(self) -> None:
        self.gate = threading.Semaphore(0)

    def release(self, n: int = 10_000) -> None:
        assert self.gate is not None
        self.gate.release(n)

    def decode(self, batch: FakeBatch) -> int:
        if self.gate is not None:
            assert self.gate.acquire(timeout=30), "the test never released this decode"
        self.chunks.append(batch.n)
        return super().decode(batch)


def lane_harness(*, chunk: int = 16, budget: int = 64) -> tuple[Harness, StatefulRunner,
                                                                 SideContext, PrefillLane]:
    runner = StatefulRunner(batch=budget)
    side = SideContext(batch=chunk)
    h = Harness(runner, budget=budget)
    lane = PrefillLane(side, runner, threads=THREADS, lane_threads=LANE_THREADS,
                       min_tokens=MIN_TOKENS, chunk=chunk, boost_chunk=chunk // 2)
    h.core.lane = lane
    return h, runner, side, lane


def steps_until(h: Harness, done, limit: float = 60.0) -> None:
    """Step until done(); a step that ran nothing waits a moment, as the engine thread does,
    so the lane's worker gets the GIL however busy the machine is."""
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "the condition never held"
        if not h.core.step():
            time.sleep(0.001)


def run(h: Harness) -> None:
    """Harness.run for the lane: until nothing is left, waiting for the worker."""
    steps_until(h, lambda: not h.core.has_work)


def decoding(h: Harness, max_tokens: int) -> EngineRequest:
    """A request that has started decoding."""
    decoder = h.submit(prompt(1, 6), max_tokens=max_tokens)
    steps_until(h, lambda: decoder.sequences[0].n_output > 0)
    return decoder


def in_lane(h: Harness, lane: PrefillLane, long_prompt: list[int],
            max_tokens: int) -> EngineRequest:
    """A long prompt, submitted and stepped until the lane has it."""
    req = h.submit(long_prompt, max_tokens=max_tokens)
    steps_until(h, lambda: lane.job is not None)
    return req


def prompt_rows(runner: FakeRunner, seq_id: int) -> list[int]:
    """How many rows of `seq_id` each main decode carried (0s left out)."""
    return [n for n in (sum(1 for e in d if e[2] == seq_id) for d in runner.decodes) if n]


def test_a_long_prompt_arriving_while_others_decode_is_computed_in_the_lane():
    h, runner, side, lane = lane_harness()
    decoders = [h.submit(prompt(i, 6), max_tokens=40) for i in range(2)]
    steps_until(h, lambda: all(len(s.tokens) > s.n_prompt for r in decoders
                               for s in r.sequences))
    long_prompt = prompt(9, 100)
    req = h.submit(long_prompt, max_tokens=5)
    run(h)
    assert h.tokens(req) == reference_output(long_prompt, 5)
    for r in decoders:
        assert h.tokens(r) == reference_output(r.prompt_tokens, 40)
    seq_id = next(slot for slot, cells in runner.kv.items() if cells[:100] == long_prompt)
    # the engine's steps carried the last prompt token and the output, never a chunk
    assert max(prompt_rows(runner, seq_id)) == 1
    assert sum(side.chunks) == 99 and max(side.chunks) <= 16
    assert h.core.stats.lane_jobs == 1 and h.core.stats.lane_tokens == 99
    assert lane.stats.tokens == 99 and lane.job is None
    # threads: the engine's context gave the lane its share, then took it back
    assert runner.threads[0] == THREADS - LANE_THREADS and runner.threads[-1] == THREADS


def test_with_nothing_decoding_the_engine_computes_the_prompt_itself():
    h, runner, side, _lane = lane_harness()
    long_prompt = prompt(3, 100)
    req = h.submit(long_prompt, max_tokens=4)
    run(h)
    assert h.tokens(req) == reference_output(long_prompt, 4)
    assert side.chunks == [] and h.core.stats.lane_jobs == 0
    assert runner.threads == []


def test_a_short_prompt_stays_in_the_step():
    h, runner, side, _lane = lane_harness()
    decoder = h.submit(prompt(1, 6), max_tokens=30)
    steps_until(h, lambda: decoder.sequences[0].n_output > 0)
    short = h.submit(prompt(2, MIN_TOKENS), max_tokens=3)  # 23 tokens to compute before the last
    run(h)
    assert h.tokens(short) == reference_output(short.prompt_tokens, 3)
    assert side.chunks == []


def test_a_second_long_prompt_waits_for_the_lane_rather_than_stall_the_decoders():
    h, runner, side, lane = lane_harness()
    side.hold()
    decoding(h, 200)
    first = in_lane(h, lane, prompt(4, 80), 3)
    second = h.submit(prompt(5, 80), max_tokens=3)
    for _ in range(20):
        h.core.step()
    second_seq = second.sequences[0]
    assert second_seq.slot is not None and second_seq.n_computed == 0
    second_id = second_seq.slot.seq_id
    # the steps meanwhile carried the decoder alone
    assert all(len(d) == 1 for d in runner.decodes[-20:])
    side.release()
    run(h)
    assert h.tokens(first) == reference_output(first.prompt_tokens, 3)
    assert h.tokens(second) == reference_output(second.prompt_tokens, 3)
    assert h.core.stats.lane_jobs == 2
    assert max(prompt_rows(runner, second_id)) == 1  # the lane computed its prompt too


def test_the_lane_starts_from_the_reused_prefix_and_hands_back_the_whole_prompt():
    h, runner, side, _lane = lane_harness()
    shared = prompt(7, 60)
    first = h.submit(shared + [3], max_tokens=2)
    run(h)
    decoder = h.submit(prompt(1, 6), max_tokens=60)
    steps_until(h, lambda: decoder.sequences[0].n_output > 0)
    longer = shared + prompt(8, 40)
    req = h.submit(longer, max_tokens=4)
    run(h)
    assert h.tokens(first) == reference_output(shared + [3], 2)
    assert h.tokens(req) == reference_output(longer, 4)
    seq = req.sequences[0]
    assert seq.n_cached == 60
    assert sum(side.chunks) == len(longer) - 1 - 60  # the prefix came over, not recomputed
    assert h.core.stats.lane_tokens == len(longer) - 1 - 60


def test_an_abort_during_the_lane_drops_its_work_and_frees_the_slot():
    h, runner, side, lane = lane_harness()
    side.hold()
    decoder = decoding(h, 80)
    req = in_lane(h, lane, prompt(6, 90), 5)
    slot_seq = req.sequences[0].slot.seq_id
    held = list(runner.kv.get(slot_seq, []))
    h.core.abort(req.request_id)
    side.release()
    run(h)
    steps_until(h, lambda: lane.job is None)  # the next step takes the dropped job back
    final = h.final(req)
    assert final.finish_reason == "cancelled"
    assert runner.kv.get(slot_seq, []) == held  # nothing loaded into the freed slot
    assert slot_seq not in runner.sets
    assert lane.stats.dropped == 1 and h.core.stats.lane_jobs == 0
    assert h.tokens(decoder) == reference_output(decoder.prompt_tokens, 80)


def test_while_the_engine_idles_the_lane_takes_every_thread():
    h, runner, side, lane = lane_harness(chunk=8)
    side.hold()
    decoder = decoding(h, 1000)
    req = in_lane(h, lane, prompt(2, 90), 3)
    side.release(1)
    steps_until(h, lambda: len(side.chunks) == 1)
    assert side.threads == [LANE_THREADS, LANE_THREADS]  # its share for the first two chunks
    h.core.abort(decoder.request_id)
    h.core.step()  # nothing to run: the engine tells the lane so
    side.release()
    run(h)
    assert h.tokens(req) == reference_output(req.prompt_tokens, 3)
    assert side.threads[2:] == [THREADS] * (len(side.threads) - 2)
    # boosted chunks are the smaller ones, so the engine gets its threads back sooner
    assert side.chunks[:2] == [8, 8] and all(n <= 4 for n in side.chunks[2:])


def test_a_refused_state_leaves_the_prompt_to_the_engine():
    h, runner, side, lane = lane_harness()

    def refuse(seq_id: int, data: bytearray) -> int:
        runner.kv[seq_id] = []
        return 0

    decoder = h.submit(prompt(1, 6), max_tokens=60)
    steps_until(h, lambda: decoder.sequences[0].n_output > 0)
    runner.state_seq_set = refuse  # type: ignore[method-assign]
    req = h.submit(prompt(3, 70), max_tokens=4)
    run(h)
    assert h.tokens(req) == reference_output(req.prompt_tokens, 4)
    assert lane.stats.failed == 1 and h.core.stats.lane_jobs == 0


def test_the_lane_leaves_media_logprob_and_lora_prompts_alone():
    h, runner, side, lane = lane_harness()
    base = dict(prompt_tokens=prompt(1, 90), sampling=SamplingParams(temperature=0),
                max_tokens=1)
    scored = EngineRequest(**base, prompt_logprobs=0)  # type: ignore[arg-type]
    lora = EngineRequest(**base, adapters=(("a.gguf", 1.0),))  # type: ignore[arg-type]
    plain = EngineRequest(**base)  # type: ignore[arg-type]
    for request in (scored, lora, plain):
        h.core.add(request)
    seqs = {name: r.sequences[0] for name, r in (("scored", scored), ("lora", lora),
                                                ("plain", plain))}
    assert not lane.takes(seqs["scored"]) and not lane.takes(seqs["lora"])
    assert lane.takes(seqs["plain"])


def test_closing_the_lane_stops_its_worker_at_the_next_chunk():
    h, runner, side, lane = lane_harness(chunk=8)
    side.hold()
    decoding(h, 200)
    in_lane(h, lane, prompt(2, 90), 3)
    side.release(1)
    steps_until(h, lambda: len(side.chunks) == 1)
    assert not lane.close(timeout=0.2)  # the worker waits inside its second chunk
    side.release()
    assert lane.close()
    assert len(side.chunks) == 2  # not the eleven the prompt needed


def test_while_a_job_runs_the_steps_carry_smaller_prompt_chunks():
    runner, side = StatefulRunner(), SideContext()
    lane = PrefillLane(side, runner, threads=2, lane_threads=1, min_tokens=MIN_TOKENS)
    assert lane.mixed_cap(128) == 128  # no job: the steps have every thread
    lane.job = object()  # type: ignore[assignment]
    assert lane.mixed_cap(128) == 65  # half the threads, but not below llama.cpp's 65 rows
    assert lane.mixed_cap(512) == 256
    four = PrefillLane(side, runner, threads=8, lane_threads=2, min_tokens=MIN_TOKENS)
    four.job = object()  # type: ignore[assignment]
    assert four.mixed_cap(128) == 96
