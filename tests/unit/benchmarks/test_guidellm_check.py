"""The pure parts of benchmarks/workloads/guidellm_check.py: reading guidellm's JSON report,
our harness's figures, the per-round ratios and the side-by-side table, the scenario file and
the sizes (the runs themselves need both servers and guidellm's venv)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks.workloads import defs, run
from benchmarks.workloads import guidellm_check as gc
from benchmarks.workloads.client import Result


def _dist(mean: float, p50: float, p99: float) -> dict[str, Any]:
    """A StatusDistributionSummary of guidellm 0.8.1, its `successful` part filled in (the
    other statuses are left empty as in a run without errors)."""
    empty = {"mean": 0.0, "median": 0.0, "count": 0, "total_sum": 0.0,
             "percentiles": {"p50": 0.0, "p99": 0.0}}
    ok = {"mean": mean, "median": p50, "mode": p50, "variance": 0.0, "std_dev": 0.0,
          "min": p50, "max": p99, "count": 8, "total_sum": mean * 8,
          "percentiles": {"p001": p50, "p01": p50, "p05": p50, "p10": p50, "p25": p50,
                          "p50": p50, "p75": p50, "p90": p99, "p95": p99, "p99": p99,
                          "p999": p99}, "pdf": None}
    return {"successful": ok, "errored": empty, "incomplete": empty, "total": ok}


def report(**over: Any) -> dict[str, Any]:
    """The shape of `guidellm run`'s JSON output (one benchmark), trimmed to what is read."""
    metrics = {
        "request_totals": {"successful": 8, "errored": 1, "incomplete": 2, "total": 11},
        "requests_per_second": _dist(0.5, 0.03, 0.9),
        "output_tokens_per_second": _dist(16.0, 0.04, 4.5),
        "time_to_first_token_ms": _dist(1500.0, 1200.0, 4400.0),
        "inter_token_latency_ms": _dist(90.0, 85.0, 140.0),
        "prompt_token_count": _dist(1568.0, 1568.0, 1573.0),
        "output_token_count": _dist(32.0, 32.0, 32.0),
        **over,
    }
    return {"metadata": {"version": 1}, "config": {},
            "benchmarks": [{"type_": "generative_benchmark", "metrics": metrics,
                            "start_time": 0.0, "end_time": 16.0, "duration": 16.0}],
            "conclusions": []}


def test_guidellm_figures_reads_rates_and_converts_milliseconds() -> None:
    fig = gc.guidellm_figures(report())
    assert fig == {"req_s": 0.5, "out_tok_s": 16.0, "ttft_p50": 1.2, "ttft_p99": 4.4,
                   "itl_p50": 0.085, "itl_p99": 0.14, "prompt_tokens": 1568.0,
                   "output_tokens": 32.0, "requests": 8, "failed": 3}


@pytest.mark.parametrize("n", [0, 2])
def test_guidellm_figures_wants_exactly_one_benchmark(n: int) -> None:
    data = report()
    data["benchmarks"] = data["benchmarks"] * n
    with pytest.raises(ValueError, match=f"one benchmark.*got {n}"):
        gc.guidellm_figures(data)


def test_our_figures_from_the_harness_results() -> None:
    results = [Result(kind="question", start=0.0, end=2.0, ttft=t, gaps=[0.05, 0.07],
                      prompt_tokens=1570, output_tokens=20) for t in (0.5, 1.5)]
    results.append(Result(kind="question", error="500: boom"))
    fig = gc.our_figures(run.figures(defs.Outcome(results, wall=4.0)))
    assert fig["requests"] == 2 and fig["failed"] == 1
    assert fig["req_s"] == pytest.approx(0.5) and fig["out_tok_s"] == pytest.approx(10.0)
    assert fig["ttft_p50"] == pytest.approx(1.0) and fig["itl_p50"] == pytest.approx(0.06)
    assert fig["prompt_tokens"] == pytest.approx(1570) and fig["output_tokens"] == pytest.approx(20)


def _round(ours: tuple[float, float], theirs: tuple[float, float]) -> dict[str, Any]:
    """A round where lmserve / llama-server run at the given req/s under each harness (the
    other figures follow from it: tok/s 10x, TTFT and ITL inverse)."""
    def figs(rps: float) -> dict[str, Any]:
        return {"figures": {"req_s": rps, "out_tok_s": 10 * rps, "ttft_p50": 1 / rps,
                            "ttft_p99": 2 / rps, "itl_p50": 0.1 / rps, "itl_p99": 0.2 / rps,
                            "prompt_tokens": 1570.0, "output_tokens": 22.0, "requests": 64,
                            "failed": 0}}
    return {"ours": {"lmserve": figs(ours[0]), "llama-server": figs(ours[1])},
            "guidellm": {"lmserve": figs(theirs[0]), "llama-server": figs(theirs[1])}}


def test_summarize_takes_medians_of_per_round_ratios() -> None:
    rounds = [_round((2.0, 1.0), (1.0, 1.0)), _round((3.0, 1.0), (3.0, 2.0)),
              _round((1.0, 1.0), (4.0, 1.0))]
    s = gc.summarize(rounds)
    assert s["ratio"]["ours"]["req_s"] == 2.0  # ratios 2, 3, 1
    assert s["ratio"]["ours"]["req_s_rounds"] == [2.0, 3.0, 1.0]
    assert s["ratio"]["guidellm"]["req_s"] == 1.5  # ratios 1, 1.5, 4
    assert s["ratio"]["ours"]["ttft_p50"] == 0.5  # inverse: 1/2, 1/3, 1
    assert s["median"]["ours"]["lmserve"]["req_s"] == 2.0
    assert s["median"]["guidellm"]["llama-server"]["out_tok_s"] == 10.0


def test_table_puts_metrics_in_rows_and_both_harnesses_side_by_side() -> None:
    lines = gc.table(gc.summarize([_round((2.0, 1.0), (4.0, 1.0))]))
    assert lines[0] == ("| metric | lmserve ours | llama-server ours | ratio ours | "
                        "lmserve guidellm | llama-server guidellm | ratio guidellm |")
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in lines[2:]}
    assert rows["requests/s"] == ["requests/s", "2.00", "1.00", "2.00", "4.00", "1.00", "4.00"]
    assert rows["ITL p50, ms"] == ["ITL p50, ms", "50.0", "100.0", "0.50", "25.0", "100.0",
                                   "0.25"]
    assert rows["requests ok"][1:4] == ["64", "64", ""]
    assert [r for r in rows] == [label for _, label, *_ in gc.METRICS] + [
        label for _, label, _ in gc.COUNTS]


def test_markdown_names_the_load_and_the_itl_difference() -> None:
    data = {"workload": "shared_prefix", "model": "smollm2", "date": "2026-12-07", "rounds": 1,
            "settings": {"threads": 2}, "requests": 64, "concurrency": 8,
            "summary": gc.summarize([_round((2.0, 1.0), (4.0, 1.0))]),
            "client_cpu_s": {"ours": [0.5, 0.7], "guidellm": [11.0, 12.0]}}
    text = gc.markdown(data)
    assert "64 requests a run at c=8" in text and "1530-token prefix" in text
    assert "each request's mean gap" in text
    assert "ours 0.6, guidellm 11.5" in text


def test_plan_mirrors_the_suite_sizes() -> None:
    full, quick = defs.Scale(), run.QUICK
    assert gc.plan("shared_prefix", full, False) == (full, 64, 8)
    scale, n, c = gc.plan("shared_prefix", quick, True)
    assert (scale.questions, n, c) == (4, 4, 8)
    scale, n, c = gc.plan("uniform", full, False)
    assert (scale.uniform_levels, n, c) == ((8,), 16, 8)
    scale, n, c = gc.plan("uniform", quick, True)
    assert (scale.uniform_levels, n, c) == ((2,), 4, 2)


def test_parse_args_takes_the_suite_settings() -> None:
    args = gc.parse_args(["--out", "x/y.json"])
    suite = run.parse_args([])
    assert args.settings == suite.settings and args.rounds == 2
    assert args.out == Path("x/y") and args.requests == 64
    quick = gc.parse_args(["--quick", "--workload", "uniform"])
    assert quick.rounds == 1 and quick.out.parent.name == "tmp"


def test_scenario_shape() -> None:
    scen = gc.scenario("shared_prefix", "http://127.0.0.1:1", "m", "/tok", 64, 8, 7,
                       Path("/o.json"))
    spec = scen["spec"]
    assert spec["profile"] == {"kind": "concurrent", "streams": [8]}
    assert spec["constraints"] == [{"kind": "max_requests", "count": 64}]
    assert spec["data"][0]["prefix_tokens"] == 1530 and spec["data"][0]["prefix_count"] == 1
    assert spec["tokenizer"] == {"kind": "huggingface_auto", "model": "/tok"}
    assert {"kind": "json", "path": "/o.json"} in spec["outputs"]
    uniform = gc.scenario("uniform", "http://127.0.0.1:1", "m", "/tok", 16, 8, 7,
                          Path("/o.json"))["spec"]["data"][0]
    assert uniform == {"kind": "synthetic_text", "prompt_tokens": 136, "output_tokens": 128}


@pytest.mark.skipif(not (gc.GUIDELLM_VENV / "bin" / "python").exists(),
                    reason="guidellm not installed (benchmarks/peers/install_peers.sh)")
def test_guidellm_accepts_the_scenario(tmp_path: Path) -> None:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(gc.scenario("shared_prefix", "http://127.0.0.1:1", "m", "/tok",
                                           64, 8, 7, tmp_path / "o.json")))
    code = ("import json, sys; from guidellm.schemas.benchmark.entrypoints import "
            "BenchmarkScenario as S; s = S.model_validate(json.load(open(sys.argv[1]))).spec; "
            "b = s.data[0].prefix_buckets[0]; print(json.dumps([s.profile.streams, "
            "s.constraints[0].count, b.prefix_tokens, b.prefix_count, s.tokenizer.model]))")
    out = subprocess.run([str(gc.GUIDELLM_VENV / "bin" / "python"), "-c", code, str(path)],
                         check=True, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [[8], 64, 1530, 1, "/tok"]
