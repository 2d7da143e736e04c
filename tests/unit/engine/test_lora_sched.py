"""LoRA adapter groups in the scheduler: one adapter set per decode step, groups take turns,
and every sequence's output is what it would be alone under its own adapters."""

from __future__ import annotations

from itertools import groupby

import pytest

from lmserve.core.lora import AdapterSet
from lmserve.engine.lora import STEPS_PER_TURN, AdapterRotation
from lmserve.engine.scheduler import EngineCore
from tests.unit.fakes import FakeBatch, FakeRunner, reference_output
from tests.unit.engine.test_scheduler import Harness, prompt

A: AdapterSet = (("/lora/a.gguf", 1.0),)
B: AdapterSet = (("/lora/b.gguf", 0.5),)
AB: AdapterSet = (("/lora/a.gguf", 1.0), ("/lora/b.gguf", 0.5))


class GroupCheckingRunner(FakeRunner):
    """Fails any decode with a row of a sequence whose adapter set is not the applied one,
    and records the set each decode ran under."""

    def __init__(self, kv_capacity: int | None = None) -> None:
        super().__init__(kv_capacity=kv_capacity)
        self.core: EngineCore | None = None
        self.step_sets: list[AdapterSet] = []

    def decode(self, batch: FakeBatch) -> int:
        assert self.core is not None
        for _tok, _pos, seq_id, _logits in batch.entries:
            owner = self.core.pool.slots[seq_id].owner
            assert owner is not None and owner.request.adapters == self.adapters, \
                f"slot {seq_id} decoded under {self.adapters}"
        status = super().decode(batch)
        if status == 0:
            self.step_sets.append(self.adapters)
        return status


def harness(turn: int = STEPS_PER_TURN,
            **kw: int) -> tuple[Harness, GroupCheckingRunner]:
    runner = GroupCheckingRunner(kv_capacity=kw.pop("kv_capacity", None))
    h = Harness(runner, **kw)
    h.core.adapters = AdapterRotation(turn)
    runner.core = h.core
    return h, runner


def test_mixed_groups_never_share_a_step_and_match_single_runs():
    h, runner = harness(running=4)
    sets = [(), A, B, AB]
    reqs = [(h.submit(prompt(i, 6 + i), max_tokens=10, adapters=sets[i % 4]), i)
            for i in range(8)]
    h.run()
    for req, i in reqs:
        assert h.tokens(req) == reference_output(prompt(i, 6 + i), 10, sets[i % 4])
    assert set(runner.step_sets) == set(sets)
    # The fake adapters really change the output, so a wrong set would have shown above.
    assert reference_output(prompt(1, 7), 10, A) != reference_output(prompt(1, 7), 10)


@pytest.mark.parametrize("turn", [1, STEPS_PER_TURN])
def test_two_busy_groups_take_turns_of_equal_length(turn):
    h, runner = harness(turn)
    h.submit(prompt(1, 8), max_tokens=12, adapters=A)
    h.submit(prompt(2, 8), max_tokens=12)
    h.run()
    sets = runner.step_sets
    assert len(sets) == 2 * 12  # a prefill and 11 decodes each, no step shared
    assert [len(list(run)) for _, run in groupby(sets)] == [turn] * (24 // turn)
    assert runner.adapter_switches == 24 // turn - 1  # the base group ran first: no switch


@pytest.mark.parametrize("turn", [1, STEPS_PER_TURN])
def test_every_busy_group_runs_within_one_round(turn):
    h, runner = harness(turn, running=6)
    for i, adapters in enumerate([(), A, B, AB, (), A]):
        h.submit(prompt(i, 5), max_tokens=9, adapters=adapters)
    h.run()
    busy = runner.step_sets[: 4 * 8]  # every group has work for at least this long
    window = 3 * turn + 1  # the others' turns, then this group's again
    for start in range(len(busy) - window + 1):
        assert len(set(busy[start:start + window])) == 4, busy[start:start + window]


def test_a_new_group_goes_after_the_current_turn_and_then_takes_turns():
    h, runner = harness()
    h.submit(prompt(3, 6), max_tokens=40, adapters=A)
    for _ in range(STEPS_PER_TURN + 1):
        h.core.step()
    late = h.submit(prompt(4, 6), max_tokens=STEPS_PER_TURN + 1, adapters=B)
    h.core.step()
    assert runner.step_sets[-1] == B  # A's turn was over: B goes at once
    h.run()
    assert h.tokens(late) == reference_output(prompt(4, 6), STEPS_PER_TURN + 1, B)
    turn = STEPS_PER_TURN
    assert runner.step_sets[turn + 1:][:2 * turn + 1] == [B] * turn + [A] * turn + [B]


def test_adapters_are_set_only_when_the_group_changes():
    h, runner = harness()
    for i in range(3):
        h.submit(prompt(i, 6), max_tokens=6, adapters=A)
    h.run()
    assert runner.adapter_switches == 1 and h.core.adapters.switches == 1
    assert h.core.adapters.steps[A] == len(runner.step_sets)
    base, base_runner = harness()
    base.submit(prompt(5, 6), max_tokens=6)
    base.run()
    assert base_runner.adapter_switches == 0  # the context starts with no adapters


def test_prefixes_are_reused_only_under_the_same_adapters():
    h, _ = harness()
    p = prompt(6, 30)
    h.submit(p, max_tokens=3)
    h.run()
    under_a = h.submit(p, max_tokens=3, adapters=A)
    h.run()
    again = h.submit(p, max_tokens=3, adapters=A)
    h.run()
    assert h.final(under_a).usage.cached_tokens == 0
    assert h.final(again).usage.cached_tokens == 29
    assert h.tokens(again) == reference_output(p, 3, A)


def test_n_choices_fork_within_their_group():
    h, runner = harness(running=4)
    p = prompt(7, 12)
    req = h.submit(p, max_tokens=6, n=3, adapters=B)
    other = h.submit(prompt(8, 12), max_tokens=6)
    h.run()
    for i in range(3):
        assert h.tokens(req, i) == reference_output(p, 6, B)
    assert h.tokens(other) == reference_output(prompt(8, 12), 6)
    assert set(runner.step_sets) == {(), B}


def test_preemption_across_groups_keeps_outputs_exact():
    h, _ = harness(kv_capacity=60, slots=4, running=2)
    p1, p2 = prompt(11, 20), prompt(12, 20)
    r1 = h.submit(p1, max_tokens=15, adapters=A)
    r2 = h.submit(p2, max_tokens=15, adapters=B)
    h.run()
    assert h.core.stats.preemptions >= 1
    assert h.tokens(r1) == reference_output(p1, 15, A)
    assert h.tokens(r2) == reference_output(p2, 15, B)
