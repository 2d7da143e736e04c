"""benchmarks/run_server_bench.py's figures: ratios are taken within a round, then the median
over rounds, so a slow spell that hits one round hits server and ceiling alike."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import run_server_bench as bench


def rounds(*figures: dict[str, dict[int, float]]) -> list[dict]:
    return [{name: {c: SimpleNamespace(output_throughput=v) for c, v in levels.items()}
             for name, levels in r.items()} for r in figures]


def test_ratios_are_medians_of_per_round_ratios() -> None:
    # Round 2 ran in a slow spell: both backends lost a third at c=8.
    data = rounds({"server": {1: 70.0, 8: 105.0}, "ceiling": {1: 72.0, 8: 110.0}},
                  {"server": {1: 72.0, 8: 70.0}, "ceiling": {1: 70.0, 8: 73.0}},
                  {"server": {1: 68.0, 8: 104.0}, "ceiling": {1: 70.0, 8: 106.0}})
    rows = {row["concurrency"]: row for row in bench.summarize(data)}
    assert rows[8]["ratios"] == pytest.approx([105 / 110, 70 / 73, 104 / 106])
    assert rows[8]["ratio"] == pytest.approx(70 / 73)  # the slow round's ratio is typical
    assert rows[8]["server"] == 104.0 and rows[8]["ceiling"] == 106.0
    # scaling: each round's c=8 against the same round's c=1, then the median
    assert rows[8]["scaling"] == pytest.approx(105 / 70)
    assert rows[8]["ceiling_scaling"] == pytest.approx(106 / 70)
    assert rows[1]["scaling"] == rows[1]["ceiling_scaling"] == 1.0


def test_median_sweep_takes_each_levels_median_round() -> None:
    data = rounds({"server": {1: 70.0, 8: 90.0}, "ceiling": {1: 1.0, 8: 1.0}},
                  {"server": {1: 60.0, 8: 110.0}, "ceiling": {1: 1.0, 8: 1.0}},
                  {"server": {1: 65.0, 8: 100.0}, "ceiling": {1: 1.0, 8: 1.0}})
    args = SimpleNamespace(input_len=128, output_len=128)
    sweep = bench.median_sweep(data, "server", args)
    assert [lvl.output_throughput for lvl in sweep.levels] == [65.0, 100.0]
