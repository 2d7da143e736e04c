"""benchmarks.cluster_scaling's pure parts: the median's interval, per-round ratios to the
1-replica figure, pooled percentiles, the router's added latency from request pairs, the
pair order, the options and the report's reading of the machine."""

from __future__ import annotations

import pytest

from benchmarks.cluster_scaling import (
    Level,
    build_report,
    configurations,
    direct_first,
    markdown,
    median_interval,
    parse_args,
    router_latency,
    router_under_load,
    scaling_summary,
)
from lmserve.bench.base import Chunk
from lmserve.bench.stats import LevelResult, RequestRecord


def level(tok_s: float, ttft: list[float], *, c: int = 4, itl: list[float] | None = None,
          replica_tokens: list[float] | None = None, outputs: int = 8) -> Level:
    return Level(concurrency=c, completed=len(ttft), failed=0, duration_s=1.0,
                 output_tok_s=tok_s, req_s=tok_s / 64, ttft_ms=ttft, itl_ms=itl or [10.0],
                 output_tokens=[outputs] * len(ttft), replica_tokens=replica_tokens or [])


def test_median_interval_uses_binomial_order_statistics() -> None:
    values = [float(x) for x in range(10, 0, -1)]  # 10 values, unsorted
    assert median_interval(values) == (2.0, 9.0)  # x(2), x(9): 97.9% coverage
    assert median_interval([float(x) for x in range(1, 7)]) == (1.0, 6.0)  # n=6: 96.9%
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # n=5 covers 93.8% at most
    wide = median_interval([float(x) for x in range(1, 101)])
    assert wide == (40.0, 61.0)


def test_scaling_summary_takes_ratios_within_each_round() -> None:
    rounds = [
        {"direct": level(100.0, [50.0, 60.0]), "router-1": level(98.0, [52.0, 62.0]),
         "router-2": level(196.0, [55.0, 65.0], c=8, replica_tokens=[60.0, 40.0])},
        # a slow round: both halve, the ratio stays 2
        {"router-2": level(100.0, [100.0, 120.0], c=8, replica_tokens=[40.0, 60.0]),
         "router-1": level(50.0, [100.0, 110.0]), "direct": level(52.0, [90.0, 95.0])},
        {"router-1": level(80.0, [70.0, 80.0]), "direct": level(80.0, [70.0, 70.0]),
         "router-2": level(120.0, [80.0, 90.0], c=8, replica_tokens=[50.0, 50.0])},
    ]
    summary = scaling_summary(rounds)
    assert list(summary) == ["direct", "router-1", "router-2"]
    two = summary["router-2"]
    assert two["replicas"] == 2 and two["concurrency"] == 8 and two["rounds"] == 3
    assert two["output_tok_s"] == 120.0  # median of 196, 100, 120
    assert two["output_tok_s_per_round"] == [196.0, 100.0, 120.0]
    assert two["vs_baseline"]["output_tok_s_per_round"] == [2.0, 2.0, 1.5]
    assert two["vs_baseline"]["output_tok_s"] == 2.0  # not 120 / 80 from the medians
    assert two["replica_token_share"] == [0.5, 0.5]
    assert two["ttft_ms"]["p50"] == 85.0  # pooled over the rounds' six requests
    assert two["ttft_ms"]["round_p50_median"] == 85.0  # of 60, 110, 85
    assert summary["router-1"]["vs_baseline"]["output_tok_s"] == 1.0
    assert summary["direct"]["replica_token_share"] == []  # no counters given
    assert summary["direct"]["output_tokens_min_max"] == [8, 8]


def test_router_latency_is_the_median_of_per_pair_differences() -> None:
    pairs = [(100.0, 102.0), (200.0, 201.0), (50.0, 53.0), (80.0, 80.5), (90.0, 89.0),
             (60.0, 62.5)]
    out = router_latency(pairs)
    assert out["pairs"] == 6
    assert out["median_diff_ms"] == 1.5  # of -1, 0.5, 1, 2, 2.5, 3
    assert out["median_diff_interval_ms"] == [-1.0, 3.0]
    assert out["direct_p50_ms"] == 85.0 and out["router_p50_ms"] == 84.75
    assert router_latency([])["median_diff_ms"] is None


def test_router_under_load_pairs_router_1_with_direct() -> None:
    rounds = [{"direct": level(100.0, [40.0], itl=[10.0, 12.0]),
               "router-1": level(95.0, [45.0], itl=[11.0, 13.0])},
              {"direct": level(50.0, [80.0]), "router-1": level(50.0, [81.0])}]
    out = router_under_load(rounds)
    assert out["output_tok_s_ratio_per_round"] == [0.95, 1.0]
    assert out["output_tok_s_ratio"] == 0.975
    assert out["ttft_p50_diff_ms_per_round"] == [5.0, 1.0]
    assert out["itl_p50_ms"] == {"direct": 10.0, "router": 11.0}


def test_level_of_keeps_each_requests_ttft_and_gaps() -> None:
    record = RequestRecord(start=1.0)
    record.on_chunk(Chunk(1, "a"), 1.25)
    record.on_chunk(Chunk(1, "b"), 1.26)
    record.on_chunk(Chunk(0, "", total_tokens=2), 1.27)
    record.finish(1.3)
    lv = Level.of(LevelResult.from_records(1, [record], 0.5), [2.0, 0.0])
    assert lv.ttft_ms == pytest.approx([250.0])
    assert lv.itl_ms == pytest.approx([10.0])
    assert lv.output_tokens == [2] and lv.output_tok_s == 4.0
    assert lv.replica_tokens == [2.0, 0.0]


def test_pairs_alternate_their_order_and_rounds_flip_it() -> None:
    assert [direct_first(k, 0) for k in range(4)] == [True, False, True, False]
    assert [direct_first(k, 1) for k in range(4)] == [False, True, False, True]
    assert configurations([1, 2, 3]) == ["direct", "router-1", "router-2", "router-3"]


def test_options() -> None:
    quick = parse_args(["--quick"])
    assert quick.rounds == 1 and quick.requests == 4 and quick.replica_counts == [1, 2, 3]
    assert str(quick.out).endswith("cluster-scaling-smollm2-quick")
    full = parse_args(["--rounds", "3", "--replicas", "2,1"])
    assert full.rounds == 3 and full.requests == 12 and full.replica_counts == [1, 2]
    with pytest.raises(SystemExit):
        parse_args(["--replicas", "2,3"])  # no 1-replica baseline
    with pytest.raises(SystemExit):
        parse_args(["--replicas", "one"])


def test_report_says_when_the_replicas_oversubscribe_the_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("benchmarks.cluster_scaling.os.cpu_count", lambda: 2)
    args = parse_args(["--quick", "--max-tokens", "8"])
    rounds = [{"direct": level(100.0, [50.0]), "router-1": level(99.0, [51.0]),
               "router-2": level(180.0, [55.0], c=8, replica_tokens=[50.0, 50.0, 0.0]),
               "router-3": level(170.0, [70.0], c=12, outputs=7,
                                 replica_tokens=[30.0, 30.0, 30.0])}]
    report = build_report(args, rounds, [(50.0, 51.0)] * 6, [], [[1.5, 2.5]])
    text = markdown(report)
    assert "| 2 replicas via router | 8 | 180.0 | 2.81 | 1.82 |" in text
    assert "| 1 replica, direct | 4 | 100.0 |" in text
    assert "50% / 50% / 0%" in text
    assert "**+1.00 ms**" in text
    assert "3 replicas of 1 thread(s) each oversubscribe it" in text
    assert "Not every request generated 8 tokens in: router-3" in text
    assert "1.5 to 2.5 on 2 cores" in text
