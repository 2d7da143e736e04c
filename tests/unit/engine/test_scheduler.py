"""EngineCore scheduling with a fake runner: batching, chunked prefill, reuse, preemption."""

from __future__ import annotations

from lmserve.core.errors import ErrorKind
from lmserve.core.events import TokenOutput
from lmserve.core.request import SamplingParams
from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import EOS, FakeRunner, reference_output


class Harness:
    def __init__(self, runner: FakeRunner, *, slots: int = 8, running: int = 4, budget: int = 64,
                 idle_tokens: int | None = None):
        self.runner = runner
        self.outputs: dict[str, list[TokenOutput]] = {}
        self.core = EngineCore(runner, n_slots=slots, max_running=running, step_tokens=budget,
                               sink=self._sink, idle_tokens=idle_tokens)

    def _sink(self, outputs: StepOutputs) -> None:
        for request, items in outputs:
            self.outputs.setdefault(request.request_id, []).extend(items)

    def submit(self, prompt: list[int], max_tokens: int = 8, **kw) -> EngineRequest:
        req = EngineRequest(prompt_tokens=prompt, sampling=SamplingParams(temperature=0),
                            max_tokens=max_tokens, **kw)
        self.core.add(req)
        return req

    def run(self, max_steps: int = 10_000) -> None:
        steps = 0
        while self.core.has_work:
            self.core.step()
            steps += 1
            assert steps < max_steps, "engine did not converge"

    def tokens(self, req: EngineRequest, index: int = 0) -> list[int]:
        return [t for o in self.outputs[req.request_id] if o.index == index for t in o.token_ids]

    def final(self, req: EngineRequest, index: int = 0) -> TokenOutput:
        finals = [o for o in self.outputs[req.request_id] if o.index == index and o.finished]
        assert len(finals) == 1
        return finals[0]


def prompt(seed: int, n: int) -> list[int]:
    return [1 + (seed * 31 + i * 17) % 49 for i in range(n)]


def test_single_request_generates_until_max_tokens():
    h = Harness(FakeRunner())
    p = prompt(1, 10)
    req = h.submit(p, max_tokens=6)
    h.run()
    assert h.tokens(req) == reference_output(p, 6)
    final = h.final(req)
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == 10 and final.usage.completion_tokens == 6
    text = "".join(o.text for o in h.outputs[req.request_id])
    assert text == "".join(f"<{t}>" for t in reference_output(p, 6))


def test_running_sequences_decode_together_and_extra_requests_wait():
    h = Harness(FakeRunner(), running=2)
    reqs = [h.submit(prompt(i, 5), max_tokens=4) for i in range(3)]
    h.core.step()
    assert len(h.core.running) == 2 and len(h.core.waiting) == 1
    h.run()
    for i, req in enumerate(reqs):
        assert h.tokens(req) == reference_output(prompt(i, 5), 4)
    multi = [d for d in h.runner.decodes if len({e[2] for e in d}) == 2]
    assert multi, "two sequences never shared a decode step"


def test_long_prompt_is_chunked_and_does_not_freeze_decoding():
    h = Harness(FakeRunner(batch=16), budget=16)
    short = h.submit(prompt(2, 4), max_tokens=30)
    h.core.step()
    h.core.step()  # short is decoding now
    long = h.submit(prompt(3, 100), max_tokens=2)
    h.run()
    long_steps = [d for d in h.runner.decodes if any(e[2] != d[0][2] for e in d) or len(d) > 1]
    assert all(len(d) <= 16 for d in h.runner.decodes)
    # While the long prompt was being prefilled, the short sequence kept decoding.
    mixed = [d for d in long_steps if len({e[2] for e in d}) == 2]
    assert len(mixed) >= 6
    assert h.tokens(short) == reference_output(prompt(2, 4), 30)
    assert h.tokens(long) == reference_output(prompt(3, 100), 2)


def test_prefix_of_finished_sequence_is_reused():
    h = Harness(FakeRunner())
    p = prompt(4, 40)
    first = h.submit(p, max_tokens=5)
    h.run()
    follow_up = p + h.tokens(first) + prompt(5, 10)
    second = h.submit(follow_up, max_tokens=5)
    h.run()
    usage = h.final(second).usage
    # Everything but the last sampled token of the first turn was in the KV already.
    assert usage.cached_tokens == 40 + 5 - 1
    assert h.tokens(second) == reference_output(follow_up, 5)
    assert h.core.pool.hits == 1


def test_shared_prefix_reuses_idle_slot_without_truncating_it():
    h = Harness(FakeRunner(), slots=4, running=2)
    system = prompt(6, 32)
    a = h.submit(system + prompt(7, 8), max_tokens=3)
    h.run()
    b = h.submit(system + prompt(8, 8), max_tokens=3)
    h.run()
    assert h.final(b).usage.cached_tokens == 32
    # a's conversation is still fully resident for its next turn.
    a_next = system + prompt(7, 8) + h.tokens(a) + [3, 4]
    c = h.submit(a_next, max_tokens=2)
    h.run()
    assert h.final(c).usage.cached_tokens == 32 + 8 + 3 - 1


def test_idle_budget_evicts_oldest_prefixes_but_keeps_the_newest_whole():
    h = Harness(FakeRunner(), slots=6, running=1, idle_tokens=50)
    reqs = []
    for seed in range(4):  # each leaves 30 prompt + 3 generated - 1 = 32 tokens resident
        reqs.append(h.submit(prompt(20 + seed, 30), max_tokens=3))
        h.run()
    resident = {s.seq_id: len(s.cached) for s in h.core.pool.slots if s.cached}
    # Newest (32) is kept whole; of the others only what fits in 50 tokens survives.
    assert sorted(resident.values()) == [32, 32]
    assert sum(len(v) for v in h.runner.kv.values()) == 64
    # The newest conversation continues from the KV; an evicted one is recomputed.
    newest = prompt(23, 30) + h.tokens(reqs[3]) + [5]
    again = h.submit(newest, max_tokens=1)
    h.run()
    assert h.final(again).usage.cached_tokens == 32
    evicted = h.submit(prompt(20, 30) + h.tokens(reqs[0]), max_tokens=1)
    h.run()
    assert h.final(evicted).usage.cached_tokens == 0


def test_stop_string_spanning_tokens_and_eos():
    runner = FakeRunner()
    h = Harness(runner)
    p = prompt(9, 6)
    ref = reference_output(p, 6)
    stop = f"{ref[2]}><{ref[3]}"  # spans two tokens' text
    req = h.submit(p, max_tokens=20, stop=[stop])
    h.run()
    final = h.final(req)
    assert final.finish_reason == "stop" and final.stop_match == stop
    text = "".join(o.text for o in h.outputs[req.request_id])
    assert text == f"<{ref[0]}><{ref[1]}><"

    eos_runner = FakeRunner(eos_after=3)
    h2 = Harness(eos_runner)
    req2 = h2.submit(p, max_tokens=20)
    h2.run()
    assert h2.final(req2).finish_reason == "stop"
    assert h2.tokens(req2)[-1] == EOS and len(h2.tokens(req2)) == 4
    h3 = Harness(FakeRunner(eos_after=3))
    req3 = h3.submit(p, max_tokens=10, ignore_eos=True)
    h3.run()
    assert EOS not in h3.tokens(req3) and h3.final(req3).finish_reason == "length"


def test_n_choices_share_one_prompt_prefill():
    h = Harness(FakeRunner())
    p = prompt(10, 30)
    req = h.submit(p, max_tokens=4, n=3)
    h.run()
    assert h.core.stats.prompt_tokens == 30
    for i in range(3):
        assert h.tokens(req, i) == reference_output(p, 4)  # the fake model ignores seeds
        assert h.final(req, i).usage.prompt_tokens == 30
    assert all(s.freed for s in h.runner.samplers)


def test_preemption_when_kv_is_full_keeps_outputs_exact():
    runner = FakeRunner(kv_capacity=60)
    h = Harness(runner, slots=4, running=2)
    p1, p2 = prompt(11, 20), prompt(12, 20)
    r1 = h.submit(p1, max_tokens=15)
    r2 = h.submit(p2, max_tokens=15)
    h.run()
    assert h.core.stats.preemptions >= 1
    assert h.tokens(r1) == reference_output(p1, 15)
    assert h.tokens(r2) == reference_output(p2, 15)


def test_a_sequence_that_cannot_fit_fails_cleanly():
    h = Harness(FakeRunner(kv_capacity=10), slots=2, running=1)
    req = h.submit(prompt(13, 20), max_tokens=4)
    h.run()
    final = h.final(req)
    assert final.finish_reason == "error" and "context" in final.error
    assert final.error_kind is ErrorKind.CAPACITY  # a 503 to the client, not a 500


def test_abort_finishes_request_and_frees_slot():
    h = Harness(FakeRunner())
    req = h.submit(prompt(14, 5), max_tokens=100)
    for _ in range(3):
        h.core.step()
    assert h.core.abort(req.request_id)
    assert h.final(req).finish_reason == "cancelled"
    assert not h.core.running and h.core.pool.n_free == len(h.core.pool.slots)
    assert not h.core.abort(req.request_id)


def test_stop_choice_ends_one_choice_as_a_stop_and_the_other_goes_on():
    h = Harness(FakeRunner())
    req = h.submit(prompt(18, 6), max_tokens=40, n=2)
    for _ in range(4):
        h.core.step()
    assert h.core.stop_choice(req.request_id, 0)
    stopped = h.final(req, 0)
    assert stopped.finish_reason == "stop" and stopped.usage is not None
    assert not h.core.stop_choice(req.request_id, 0)  # already over
    h.run()
    assert h.final(req, 1).finish_reason == "length" and len(h.tokens(req, 1)) == 40
    assert len(h.tokens(req, 0)) < 40 and h.core.pool.n_free == len(h.core.pool.slots)


def test_flush_drops_idle_prefixes():
    h = Harness(FakeRunner())
    h.submit(prompt(15, 12), max_tokens=2)
    h.run()
    assert h.core.pool.resident_tokens > 0
    assert h.core.pool.flush() == 1
    assert h.core.pool.resident_tokens == 0


def test_n_choices_under_kv_pressure_still_converge():
    runner = FakeRunner(kv_capacity=70)
    h = Harness(runner, slots=6, running=3)
    p = prompt(16, 20)
    req = h.submit(p, max_tokens=12, n=2)
    other = h.submit(prompt(17, 20), max_tokens=12)
    h.run()
    for i in range(2):
        assert h.tokens(req, i) == reference_output(p, 12)
    assert h.tokens(other) == reference_output(prompt(17, 20), 12)


def test_step_reports_whether_it_ran():
    h = Harness(FakeRunner())
    assert h.core.step() is False
    h.submit(prompt(18, 4), max_tokens=1)
    assert h.core.step() is True



def test_mixed_prefill_caps_prompt_tokens_while_others_decode():
    h = Harness(FakeRunner(batch=64), budget=64)
    h.core.mixed_prefill = 8
    short = h.submit(prompt(2, 4), max_tokens=40)
    h.core.step()
    h.core.step()  # short is decoding now
    long = h.submit(prompt(3, 60), max_tokens=2)
    h.run()
    seq_short = {e[2] for d in h.runner.decodes[2:3] for e in d}
    mixed = [d for d in h.runner.decodes if len({e[2] for e in d}) == 2]
    # every step that decoded `short` carried at most 8 prompt tokens of `long`
    assert mixed and all(len([e for e in d if e[2] not in seq_short]) <= 8 for d in mixed)
    assert h.tokens(short) == reference_output(prompt(2, 4), 40)
    assert h.tokens(long) == reference_output(prompt(3, 60), 2)


def test_mixed_prefill_leaves_the_whole_budget_when_nothing_decodes():
    h = Harness(FakeRunner(batch=64), budget=64)
    h.core.mixed_prefill = 8
    h.submit(prompt(3, 60), max_tokens=2)
    h.core.step()
    assert len(h.runner.decodes[0]) == 60


def test_a_request_waits_for_a_prefix_being_computed_then_shares_it():
    h = Harness(FakeRunner(batch=16), budget=16)
    h.core.prefix_wait = 8
    system = prompt(6, 64)
    a = h.submit(system + prompt(7, 4), max_tokens=3)
    h.core.step()  # a computes the first 16 tokens of the shared prefix
    b = h.submit(system + prompt(8, 4), max_tokens=3)
    h.run()
    # b computed only what follows the prefix a had computed, and answers as it would alone
    assert h.final(b).usage.cached_tokens == 64
    assert h.tokens(b) == reference_output(system + prompt(8, 4), 3)
    assert h.tokens(a) == reference_output(system + prompt(7, 4), 3)
    assert h.core.stats.prefix_waits == 1
    prompt_rows = sum(1 for d in h.runner.decodes for e in d)
    assert prompt_rows < 2 * 64  # the shared prefix was computed once


def test_no_wait_for_a_prefix_shorter_than_prefix_wait():
    h = Harness(FakeRunner(batch=16), budget=16)
    h.core.prefix_wait = 32
    system = prompt(6, 20)
    h.submit(system + prompt(7, 30), max_tokens=3)
    h.core.step()
    h.submit(system + prompt(8, 30), max_tokens=3)
    h.core.step()
    assert len(h.core.running) == 2 and h.core.stats.prefix_waits == 0
