"""SGLang session turns (dialects.sglang.sessions): how a turn's prompt is built from the turn
it continues, replace and its branches, and the refusals, without a model."""

from __future__ import annotations

import pytest

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.dialects.sglang import sessions
from lmserve.dialects.sglang.encoder import Sample

BOS = 1


class FakeGeneration:
    def __init__(self) -> None:
        self.finished = False

    def close(self) -> None:
        self.finished = True


def opened(capacity: int = 100) -> tuple[sessions.Sessions, sessions.Session]:
    registry = sessions.Sessions()
    sid = registry.open(sessions.OpenSessionRequest(capacity_of_str_len=capacity), None)
    return registry, registry.get(sid, None, False)


def run_turn(session: sessions.Session, turn_rid: str, new: list[int], output: list[int],
             done: bool = True, **params: object) -> sessions.Turn:
    plan = sessions.plan_turn(session, sessions.parse_params({"id": session.id, **params}),
                              new, BOS, "m", turn_rid)
    generation = FakeGeneration()
    sample = Sample(rid=turn_rid, position=0, prompt_tokens=len(plan.input_ids))
    sample.output_ids.extend(output)
    generation.finished = done
    return sessions.add_turn(plan, turn_rid, 3, generation, sample)  # type: ignore[arg-type]


def code(exc: pytest.ExceptionInfo[LmserveError]) -> str | None:
    return exc.value.code


def test_a_turn_continues_the_named_turn_like_sglang():
    _, s = opened()
    first = run_turn(s, "a", [BOS, 5, 6], [7, 8, 9, 10])  # 4 outputs, max_new_tokens 3
    second = run_turn(s, "b", [BOS, 11], [12], rid="a")  # BOS dropped, output cut at 3
    assert second.input_ids == [BOS, 5, 6, 7, 8, 9, 11] and second.parent is first
    dropped = run_turn(s, "c", [13], [], rid="a", drop_previous_output=True)
    assert dropped.input_ids == [BOS, 5, 6, 13]
    cut = run_turn(s, "d", [14], [], rid="b", offset=-1)
    assert cut.input_ids == [BOS, 5, 6, 7, 8, 9, 11, 14]  # b's last output token cut
    root = run_turn(s, "e", [BOS, 2], [])
    assert root.input_ids == [BOS, 2] and root.parent is None
    assert s.model == "m" and set(s.turns) == {"a", "b", "c", "d", "e"}


def test_replace_drops_the_branches_and_aborts_the_named_turn():
    _, s = opened()
    run_turn(s, "a", [5], [6])
    running = run_turn(s, "b", [7], [8], done=False, rid="a")
    run_turn(s, "c", [9], [], rid="a")
    replaced = run_turn(s, "d", [10], [], rid="a", replace=True)
    assert set(s.turns) == {"a", "d"} and running.generation.finished
    assert replaced.input_ids == [5, 6, 10]
    run_turn(s, "e", [11], [], replace=True)  # no rid: every turn gives way
    assert set(s.turns) == {"e"}


def test_refusals():
    registry, s = opened(capacity=4)
    run_turn(s, "a", [5], [6, 7], done=False)
    with pytest.raises(LmserveError) as exc:
        run_turn(s, "b", [8], [], rid="a")
    assert code(exc) == "session_turn_running"
    with pytest.raises(LmserveError) as exc:
        run_turn(s, "b", [8], [], rid="zz")
    assert code(exc) == "session_turn_not_found"
    with pytest.raises(LmserveError) as exc:
        run_turn(s, "a", [8], [])
    assert code(exc) == "duplicate_rid"
    with pytest.raises(LmserveError) as exc:
        run_turn(s, "b", [1, 2, 3, 4, 5], [])
    assert code(exc) == "session_capacity_exceeded" and exc.value.kind is \
        ErrorKind.INVALID_REQUEST
    with pytest.raises(LmserveError) as exc:
        sessions.plan_turn(s, sessions.parse_params({"id": s.id}), [3], BOS, "other", "x")
    assert exc.value.param == "model"
    with pytest.raises(LmserveError) as exc:
        registry.open(sessions.OpenSessionRequest(capacity_of_str_len=9, session_id=s.id), None)
    assert code(exc) == "session_exists"
    with pytest.raises(LmserveError) as exc:
        registry.get(s.id, "someone", False)
    assert exc.value.kind is ErrorKind.PERMISSION
    closed = registry.close(s.id, None, False)
    assert closed.key == f"sglang:{s.id}" and not closed.turns
    assert closed is s
    with pytest.raises(LmserveError) as exc:
        registry.get(s.id, None, True)
    assert code(exc) == "session_closed"
    with pytest.raises(LmserveError) as exc:
        registry.get("never", None, True)
    assert code(exc) == "session_not_found"
    for bad in ([{"id": "x"}], {"rid": "a"}, {"id": "x", "other": 1}):
        with pytest.raises(LmserveError) as exc:
            sessions.parse_params(bad)
        assert (exc.value.param or "").startswith("session_params")
