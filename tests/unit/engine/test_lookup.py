"""Prompt-lookup speculation: the n-gram index, draft sizing, and EngineCore verification.

The fake runner checks that every decode continues each sequence's KV exactly, so a rejected
guess that stayed in the KV, or a position off by one, fails the run."""

from __future__ import annotations

import pytest

from lmserve.core.request import SamplingParams
from lmserve.engine.draft_model import ModelDrafter
from lmserve.engine.lookup import DraftLength, NgramIndex
from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import EOS, FakeRunner, FakeSampler


def repeating(last: int, pos: int) -> int:
    """Counts 1..10 in a loop, except that every 13th position breaks the pattern."""
    if pos % 13 == 0:
        return 20 + pos % 7
    return last % 10 + 1


class PatternSampler(FakeSampler):
    def sample(self, ctx: "PatternRunner", idx: int) -> int:  # type: ignore[override]
        token, pos, _seq, logits = ctx.batch.entries[idx]
        assert logits, "sampled a row without logits"
        self.count += 1
        if self.eos_after is not None and self.count > self.eos_after and EOS not in self.banned:
            return EOS
        return repeating(token, pos)


class PatternRunner(FakeRunner):
    def make_sampler(self, params, seed, banned):  # type: ignore[override]
        sampler = PatternSampler(banned, self.eos_after)
        self.samplers.append(sampler)
        return sampler


def run(prompts: list[list[int]], *, lookup: int, max_tokens: int = 60, running: int = 4,
        budget: int = 64, stop: list[str] | None = None, eos_after: int | None = None,
        logprobs: int | None = None, drafter: ModelDrafter | None = None
        ) -> tuple[list[list[int]], EngineCore, PatternRunner]:
    runner = PatternRunner(eos_after=eos_after)
    outputs: dict[str, list[int]] = {}

    def sink(step: StepOutputs) -> None:
        for request, items in step:
            outputs.setdefault(request.request_id, []).extend(
                t for o in items for t in o.token_ids)

    core = EngineCore(runner, n_slots=8, max_running=running, step_tokens=budget, sink=sink,
                      lookup_tokens=lookup, drafter=drafter)
    requests = [EngineRequest(prompt_tokens=p, sampling=SamplingParams(temperature=0),
                              max_tokens=max_tokens, stop=stop or [], logprobs=logprobs)
                for p in prompts]
    for request in requests:
        core.add(request)
    steps = 0
    while core.has_work:
        core.step()
        steps += 1
        assert steps < 10_000
    return [outputs[r.request_id] for r in requests], core, runner


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2], [5, 6, 7, 8, 9, 10, 1, 2, 3],
           [3, 4, 5, 6, 7, 8, 9], [30, 31, 32, 33]]


def test_index_drafts_what_followed_the_latest_occurrence():
    index = NgramIndex(sizes=(3, 2))
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 6, 2, 3]
    assert index.draft(tokens, 4) == [7, 6, 2, 3]  # latest "2 3" continued with 7
    assert index.draft(tokens + [7], 3) == [6, 2, 3]  # "2 3 7" seen once, followed by 6
    assert index.draft([1, 2, 3, 4], 4) == []
    assert index.draft(tokens, 0) == []


def test_index_prefers_the_longest_ngram():
    index = NgramIndex(sizes=(3, 2))
    tokens = [8, 1, 2, 50, 9, 1, 2, 60, 8, 1, 2]
    assert index.draft(tokens, 1) == [50]  # "8 1 2" beats the later "1 2" -> 60


def test_index_grows_incrementally_like_a_fresh_one():
    grown = NgramIndex()
    tokens: list[int] = []
    for t in [4, 5, 6, 4, 5, 7, 4, 5, 6, 4, 5]:
        tokens.append(t)
        assert grown.draft(tokens, 3) == NgramIndex().draft(tokens, 3)


def test_draft_length_follows_the_drafts():
    size = DraftLength(8)
    assert size.current == 8
    size.update(8, 8)
    assert size.current == 8
    size.update(8, 2)
    assert size.current == 3
    size.update(3, 3)
    assert size.current == 5
    size.update(5, 0)
    assert size.current == 2


def test_mostly_right_guesses_keep_drafting():
    size = DraftLength(8)
    for _ in range(20):
        size.update(8, 6)  # 6 right, then a wrong one: p = 6/7
        size.update(7, 7)
    assert size.rate > 0.85 and size.current > 0


def test_drafting_stops_when_guesses_do_not_pay_and_is_retried_later():
    size = DraftLength(8, row_cost=0.5)
    wrong = 0
    while size.current:
        size.update(size.current, 0)
        wrong += 1
    assert wrong <= 4 and size.rate <= 0.5
    steps = 0
    while size.current == 0:  # no drafts: the evidence fades toward the prior (p = 0.75)
        size.skipped()
        steps += 1
        assert steps < 30
    assert steps >= 2 and size.current == 2


@pytest.mark.parametrize("budget", [64, 6])
def test_speculation_changes_no_output_and_accepts_guesses(budget):
    plain, _, _ = run(PROMPTS, lookup=0, budget=budget)
    spec, core, _ = run(PROMPTS, lookup=8, budget=budget)
    assert spec == plain
    assert core.stats.draft_tokens > 0
    assert 0 < core.stats.accepted_tokens < core.stats.draft_tokens  # some guesses fail
    assert core.stats.generated_tokens == sum(len(o) for o in plain)


def test_speculation_takes_fewer_steps():
    _, plain_core, _ = run(PROMPTS[:1], lookup=0, max_tokens=120)
    _, spec_core, _ = run(PROMPTS[:1], lookup=8, max_tokens=120)
    assert spec_core.stats.steps < plain_core.stats.steps / 2


def test_max_tokens_and_stops_cut_a_verified_draft():
    for max_tokens in (1, 2, 7, 23):
        plain, _, _ = run(PROMPTS, lookup=0, max_tokens=max_tokens)
        spec, _, _ = run(PROMPTS, lookup=8, max_tokens=max_tokens)
        assert spec == plain and all(len(o) == max_tokens for o in spec)
    plain, _, _ = run(PROMPTS, lookup=0, stop=["<7><8>"])
    spec, _, runner = run(PROMPTS, lookup=8, stop=["<7><8>"])
    assert spec == plain
    plain, _, _ = run(PROMPTS, lookup=0, eos_after=17)
    spec, _, _ = run(PROMPTS, lookup=8, eos_after=17)
    assert spec == plain


def test_finished_sequences_leave_no_guesses_in_the_kv():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    outs, core, runner = run([prompt], lookup=8, max_tokens=30, stop=["<9><10><1>"])
    slot = next(s for s in core.pool.slots if s.cached)
    assert runner.kv[slot.seq_id] == slot.cached  # the KV is exactly the kept tokens


def test_logprob_requests_are_not_speculated():
    _, core, _ = run(PROMPTS, lookup=8, logprobs=0)
    assert core.stats.draft_tokens == 0
