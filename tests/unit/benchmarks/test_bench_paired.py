"""benchmarks.harness.paired: backends take turns level by level, the order rotated every level
and every round, each request with its own prompt, probes around their backend's levels."""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.harness.paired import rotated, take_turns
from tests.unit.bench.test_bench import FakeBackend


class CountingProbe:
    def __init__(self) -> None:
        self.started = self.finished = 0

    async def start(self) -> None:
        self.started += 1

    async def finish(self) -> dict[str, Any]:
        self.finished += 1
        return {"level": self.finished}


def test_rotated() -> None:
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_take_turns_rotates_and_never_repeats_a_prompt() -> None:
    backends = {"a": FakeBackend(), "b": FakeBackend()}
    probe, order = CountingProbe(), []
    rounds = asyncio.run(take_turns(
        backends, [1, 4], rounds=2, input_len=8, output_len=3, probes={"a": probe},
        on_level=lambda r, name, level: order.append((r, level.concurrency, name))))
    assert order == [(0, 1, "a"), (0, 1, "b"), (0, 4, "b"), (0, 4, "a"),
                     (1, 1, "b"), (1, 1, "a"), (1, 4, "a"), (1, 4, "b")]
    assert len(rounds) == 2 and all(set(r) == {"a", "b"} for r in rounds)
    assert [sorted(r["a"]) for r in rounds] == [[1, 4], [1, 4]]
    level = rounds[1]["b"][4]
    assert level.completed == 8 and level.engine is None  # max(4, 2 x 4) requests, no probe
    assert probe.started == probe.finished == 4 and rounds[1]["a"][4].engine == {"level": 4}
    prompts = backends["a"].prompts + backends["b"].prompts
    assert len(prompts) == 2 * 2 * (4 + 8) and len(set(prompts)) == len(prompts)
