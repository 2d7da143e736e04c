"""Session pins in the slot pool (engine.prefix_cache): a session's KV stays resident between
its turns, within the pin budget, and ordinary idle cache again once unpinned."""

from __future__ import annotations

from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import FakeRunner
from tests.unit.engine.test_scheduler import Harness, prompt


def turn(h: Harness, tokens: list[int], session: str | None = None, max_tokens: int = 3
         ) -> EngineRequest:
    req = h.submit(tokens, max_tokens=max_tokens, pin=session)
    h.run()
    return req


def follow_up(h: Harness, req: EngineRequest, extra: list[int]) -> list[int]:
    return req.prompt_tokens + h.tokens(req) + extra


def traffic(h: Harness, n: int = 3) -> None:
    """Unrelated requests, enough to cycle every unpinned slot of a 3-slot pool."""
    for seed in range(n):  # starting with a token no other prompt here starts with
        turn(h, [50 + seed, *prompt(seed, 19)])


def test_pinned_session_survives_traffic_that_evicts_it_unpinned():
    for session in ("s1", None):
        h = Harness(FakeRunner(), slots=3, running=2)
        first = turn(h, prompt(1, 30), session)
        traffic(h)
        second = turn(h, follow_up(h, first, [7, 8]), session)
        cached = h.final(second).usage.cached_tokens
        assert cached == (30 + 3 - 1 if session else 0)
    h = Harness(FakeRunner(), slots=3, running=2)
    first = turn(h, prompt(1, 30), "s1")
    assert list(h.core.pool.pins) == ["s1"] and h.core.pool.pinned_tokens == 32
    assert h.core.pool.n_free == 2  # the pinned slot is not free to others


def test_other_requests_copy_a_pinned_prefix_but_never_take_it():
    h = Harness(FakeRunner(), slots=3, running=2)
    system = prompt(2, 24)
    first = turn(h, system + prompt(3, 6), "s1")
    other = turn(h, system + prompt(4, 6))
    assert h.final(other).usage.cached_tokens == 24  # shared by copy
    traffic(h, 2)
    second = turn(h, follow_up(h, first, [5]), "s1")
    assert h.final(second).usage.cached_tokens == 24 + 6 + 3 - 1


def test_a_new_pin_over_the_slot_budget_unpins_the_oldest_session():
    h = Harness(FakeRunner(), slots=4, running=2)  # two cache slots: two pins at most
    a = turn(h, prompt(5, 20), "a")
    turn(h, prompt(6, 20), "b")
    turn(h, prompt(7, 20), "c")
    assert set(h.core.pool.pins) == {"b", "c"} and h.core.pool.pins_dropped == 1
    traffic(h, 4)
    again = turn(h, follow_up(h, a, [1]), "a")
    assert h.final(again).usage.cached_tokens == 0  # a lost its pin, then its KV


def test_the_token_budget_bounds_the_pinned_sessions():
    h = Harness(FakeRunner(), slots=4, running=1)
    h.core.pool.pin_tokens = 50
    turn(h, prompt(8, 20), "a")  # 22 tokens
    turn(h, prompt(9, 20), "b")  # 22: both fit in 50
    assert set(h.core.pool.pins) == {"a", "b"}
    turn(h, prompt(10, 20), "c")  # a third would make 66: the oldest goes
    assert set(h.core.pool.pins) == {"b", "c"}
    turn(h, prompt(11, 60), "d")  # larger than the whole budget: not pinned, nobody unpinned
    assert set(h.core.pool.pins) == {"b", "c"}


def test_unpin_returns_the_kv_to_the_ordinary_cache():
    h = Harness(FakeRunner(), slots=3, running=2)
    first = turn(h, prompt(12, 30), "s1")
    assert h.core.unpin("s1") and not h.core.unpin("s1")
    assert not h.core.pool.pins and h.core.pool.n_free == 3
    traffic(h)
    second = turn(h, follow_up(h, first, [3]), "s1")
    assert h.final(second).usage.cached_tokens == 0


def test_unpin_while_a_turn_runs_keeps_it_from_pinning_when_it_ends():
    h = Harness(FakeRunner(), slots=3, running=2)
    req = h.submit(prompt(13, 10), max_tokens=20, pin="s1")
    h.core.step()
    assert not h.core.unpin("s1")  # nothing pinned yet; the running turn forgets its session
    h.run()
    assert req.pin is None and not h.core.pool.pins


def test_kv_pressure_evicts_pinned_kv_last_and_flush_keeps_it():
    h = Harness(FakeRunner(), slots=4, running=1)
    turn(h, prompt(14, 20), "s1")
    turn(h, prompt(15, 20))
    assert h.core.pool.flush() == 1 and list(h.core.pool.pins) == ["s1"]
    turn(h, prompt(16, 20))
    assert h.core.pool.evict_lru_idle()  # the unpinned one goes first
    assert list(h.core.pool.pins) == ["s1"]
    assert h.core.pool.evict_lru_idle()  # then the session's
    assert not h.core.pool.pins and h.core.pool.pins_dropped == 1
