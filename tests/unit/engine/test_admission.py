"""Admission order and limits with a fake runner: priority, fair share across callers, the
prompt-token cap of the queue, the drain's refusal and its cut (engine.admission, client)."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput
from lmserve.core.request import SamplingParams
from lmserve.engine.admission import WaitQueue
from lmserve.engine.client import EngineClient
from lmserve.engine.loop import EngineThread
from lmserve.engine.scheduler import EngineCore, StepOutputs
from lmserve.engine.sequence import EngineRequest, Sequence
from tests.unit.fakes import FakeRunner


class Harness:
    """One engine with one running sequence at a time, so finishing order is admission order."""

    def __init__(self, running: int = 1) -> None:
        self.finished: list[str] = []
        self.outputs: list[TokenOutput] = []
        self.core = EngineCore(FakeRunner(), n_slots=4, max_running=running, step_tokens=64,
                               sink=self._sink)

    def _sink(self, outputs: StepOutputs) -> None:
        for request, items in outputs:
            self.outputs.extend(items)
            if request.finished and request.request_id not in self.finished:
                self.finished.append(request.request_id)

    def add(self, name: str, *, caller: str | None = None, priority: int = 0,
            n: int = 1) -> EngineRequest:
        request = EngineRequest(prompt_tokens=[1, 2, 3], sampling=SamplingParams(temperature=0),
                                max_tokens=2, request_id=name, caller=caller, priority=priority,
                                n=n)
        self.core.add(request)
        return request

    def run(self) -> list[str]:
        for _ in range(10_000):
            if not self.core.has_work:
                return self.finished
            self.core.step()
        raise AssertionError("the engine did not converge")


def test_lower_priority_values_go_first_and_equal_priorities_keep_arrival_order():
    h = Harness()
    h.add("late", priority=5)
    h.add("a", priority=0)
    h.add("urgent", priority=-1)
    h.add("b", priority=0)
    h.add("c")
    assert h.run() == ["urgent", "a", "b", "c", "late"]


def test_callers_take_turns_so_a_long_queue_does_not_starve_another_caller():
    h = Harness()
    for i in range(5):
        h.add(f"a{i}", caller="alice")
    h.add("b0", caller="bob")
    h.add("b1", caller="bob")
    h.add("c0", caller="carol")
    assert h.run() == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]


def test_a_caller_arriving_later_is_served_within_one_turn():
    h = Harness()
    for i in range(4):
        h.add(f"a{i}", caller="alice")
    h.core.step()  # a0 runs
    h.core.step()
    h.add("b0", caller="bob")
    order = h.run()
    assert order.index("b0") <= 2, order  # after a0 and at most one more of alice's


def test_unnamed_callers_share_one_class_in_arrival_order():
    h = Harness()
    for i in range(3):
        h.add(f"x{i}")
    h.add("k0", caller="key:k")
    assert h.run() == ["x0", "k0", "x1", "x2"]


def test_priority_comes_before_fair_share():
    h = Harness()
    for i in range(3):
        h.add(f"a{i}", caller="alice", priority=-1)
    h.add("b0", caller="bob")
    assert h.run() == ["a0", "a1", "a2", "b0"]


def test_the_choices_of_one_request_stay_together():
    h = Harness(running=2)
    h.add("pair", caller="alice", n=2)
    h.add("b0", caller="bob")
    order = h.run()
    assert order[0] == "pair"
    assert {o.index for o in h.outputs if o.finished} == {0, 1}


def test_a_preempted_sequence_goes_back_before_every_priority():
    queue = WaitQueue()
    urgent = EngineRequest(prompt_tokens=[1], sampling=SamplingParams(), max_tokens=1,
                           priority=-100)
    urgent.sequences = [Sequence.for_request(urgent, 0)]
    queue.add(urgent)
    old = EngineRequest(prompt_tokens=[1, 2], sampling=SamplingParams(), max_tokens=1)
    old.sequences = [Sequence.for_request(old, 0)]
    queue.appendleft(old.sequences[0])
    assert [s.request for s in queue] == [old, urgent]


def test_the_queue_counts_each_request_prompt_once_when_it_leaves():
    h = Harness(running=4)
    a = h.add("a", n=3)
    b = h.add("b")
    assert h.core.waiting.left_tokens == 0
    h.core.step()
    assert h.core.waiting.left_tokens == len(a.prompt_tokens) + len(b.prompt_tokens)
    h.core.abort("a")
    h.run()
    assert h.core.waiting.left_tokens == 6


# -- the client: the token cap and the drain --------------------------------------------------

@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch):
    """An EngineClient whose engine runs here, step by step, instead of in its thread."""
    monkeypatch.setattr(EngineThread, "alive", property(lambda self: True))
    loop = asyncio.new_event_loop()

    def factory(sink):
        return EngineCore(FakeRunner(), n_slots=4, max_running=2, step_tokens=64, sink=sink)

    engine = EngineClient(factory, loop=loop, max_queue=100, max_queued_tokens=20)
    monkeypatch.setattr(engine._thread, "submit", engine.core.add)
    yield engine
    loop.close()


def _request(tokens: int) -> EngineRequest:
    return EngineRequest(prompt_tokens=list(range(1, tokens + 1)),
                         sampling=SamplingParams(temperature=0), max_tokens=2)


def test_prompt_tokens_waiting_past_the_cap_get_429_until_the_engine_admits_them(client):
    client.submit(_request(10))
    client.submit(_request(10))
    assert client.queued_tokens == 20
    with pytest.raises(LmserveError) as refused:
        client.submit(_request(5))
    error = refused.value
    assert error.kind is ErrorKind.OVERLOADED and error.kind.http_status == 429
    assert error.code == "server_overloaded" and error.retry_after == 1.0
    assert "20 prompt tokens queued" in error.message
    client.core.step()  # both are admitted: nothing waits any more
    assert client.queued_tokens == 0
    client.submit(_request(5))


def test_a_prompt_longer_than_the_cap_is_taken_when_nothing_waits(client):
    client.submit(_request(50))
    with pytest.raises(LmserveError):
        client.submit(_request(1))


def test_a_draining_client_refuses_with_503_and_retry_after(client):
    client.draining = True
    with pytest.raises(LmserveError) as refused:
        client.submit(_request(1))
    assert refused.value.kind is ErrorKind.DRAINING and refused.value.kind.http_status == 503
    assert refused.value.retry_after and refused.value.code == "server_draining"


def test_the_drain_cut_ends_running_and_waiting_sequences_with_its_kind():
    h = Harness()
    h.add("running")
    h.add("waiting")
    h.core.step()
    h.core.fail_all("the server shut down", ErrorKind.DRAINING)
    finals = [o for o in h.outputs if o.finished]
    assert len(finals) == 2 and not h.core.has_work
    assert {(o.finish_reason, o.error_kind, o.error) for o in finals} == {
        ("error", ErrorKind.DRAINING, "the server shut down")}
