"""The harness pieces the peer benchmark adds: /metrics step timings, the sweep's level probe,
token counts when a server sends no usage, the non-streamed length check, ratio tables."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx
import pytest

from benchmarks.harness.compare import markdown, ratios
from benchmarks.harness.engine_metrics import (MetricsProbe, counter_total, parse_counters,
                                               step_timings)
from lmserve.bench import (BenchRequest, Chunk, OpenAIHTTPBackend, from_json, run_level,
                           sweep, to_json)


def exposition(steps: int, batch: int, generated: int, decode_s: float, sample_s: float) -> str:
    """Counters the way lmserve's /metrics renders them (one model, every phase)."""
    lines = [
        "# TYPE lmserve_decode_steps counter", f'lmserve_decode_steps_total{{model="m"}} {steps}',
        "# TYPE lmserve_batch_tokens counter", f'lmserve_batch_tokens_total{{model="m"}} {batch}',
        "# TYPE lmserve_generated_tokens counter",
        f'lmserve_generated_tokens_total{{model="m"}} {generated}',
        "# TYPE lmserve_step_phase_seconds counter",
    ]
    phases = {"schedule": 0.001, "batch_build": 0.002, "decode": decode_s, "sample": sample_s,
              "detokenize": 0.0}
    lines += [f'lmserve_step_phase_seconds_total{{model="m",phase="{p}"}} {v}'
              for p, v in phases.items()]
    lines += ["# TYPE lmserve_requests_running gauge", 'lmserve_requests_running{model="m"} 3']
    return "\n".join(lines) + "\n"


def test_parse_counters_reads_steps_tokens_and_phases() -> None:
    counters = parse_counters(exposition(10, 300, 40, 2.0, 0.05))
    assert counters["steps"] == 10 and counters["batch_tokens"] == 300
    assert counters["generated_tokens"] == 40
    assert counters["decode"] == 2.0 and counters["sample"] == 0.05
    assert counters["schedule"] == 0.001


def test_counter_total_sums_one_counter_over_its_labels() -> None:
    text = exposition(10, 300, 40, 2.0, 0.05) + (
        "# TYPE lmserve_lookup_draft_tokens counter\n"
        'lmserve_lookup_draft_tokens_total{model="a"} 7\n'
        'lmserve_lookup_draft_tokens_total{model="b"} 5\n')
    assert counter_total(text, "lmserve_lookup_draft_tokens") == 12
    assert counter_total(text, "lmserve_decode_steps") == 10
    assert counter_total(text, "lmserve_disk_cache_saves") == 0  # absent: nothing counted


def test_step_timings_are_per_step_deltas() -> None:
    before = parse_counters(exposition(10, 300, 40, 2.0, 0.05))
    after = parse_counters(exposition(30, 700, 100, 4.0, 0.09))
    timings = step_timings(before, after)
    assert timings["steps"] == 20
    assert timings["batch_tokens_per_step"] == pytest.approx(20.0)
    assert timings["generated_per_step"] == pytest.approx(3.0)
    assert timings["step_ms"]["decode"] == pytest.approx(100.0)
    assert timings["step_ms"]["sample"] == pytest.approx(2.0)
    assert timings["step_ms"]["schedule"] == pytest.approx(0.0)
    assert timings["step_ms_total"] == pytest.approx(102.0)


def test_step_timings_without_steps_are_none() -> None:
    same = parse_counters(exposition(5, 50, 5, 1.0, 0.1))
    timings = step_timings(same, same)
    assert timings["steps"] == 0
    assert timings["step_ms"]["decode"] is None and timings["step_ms_total"] is None
    assert timings["batch_tokens_per_step"] is None


async def test_metrics_probe_scrapes_root_metrics_around_a_level() -> None:
    pages = iter([exposition(0, 0, 0, 0.0, 0.0), exposition(4, 40, 8, 0.4, 0.0)])
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, text=next(pages))

    probe = MetricsProbe("http://srv:1/v1", transport=httpx.MockTransport(handler))
    with pytest.raises(RuntimeError):
        await probe.finish()
    await probe.start()
    timings = await probe.finish()
    await probe.aclose()
    assert paths == ["/metrics", "/metrics"]
    assert timings["steps"] == 4 and timings["step_ms"]["decode"] == pytest.approx(100.0)


class CountingProbe:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def finish(self) -> dict[str, Any]:
        self.calls.append("finish")
        return {"steps": len(self.calls)}


class TinyBackend:
    name = "tiny"

    async def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]:
        for _ in range(req.max_tokens):
            yield Chunk(1, "x")

    async def aclose(self) -> None:
        pass


async def test_sweep_probes_each_level_but_not_the_warmup() -> None:
    probe = CountingProbe()
    result = await sweep(TinyBackend(), [1, 2], input_len=4, output_len=3,
                         requests_per_level=2, warmup=1, probe=probe)
    assert probe.calls == ["start", "finish", "start", "finish"]
    assert [lv.engine for lv in result.levels] == [{"steps": 2}, {"steps": 4}]
    again = from_json(json.loads(json.dumps(to_json(result))))
    assert again.levels[1].engine == {"steps": 4}
    assert again.levels[0].mean_output_tokens == 3


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def stream_backend(events: list[dict[str, Any]], seen: list[dict[str, Any]] | None = None,
                   **kw: Any) -> OpenAIHTTPBackend:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse(events),
                              headers={"content-type": "text/event-stream"})

    return OpenAIHTTPBackend("http://srv", "m", transport=httpx.MockTransport(handler), **kw)


async def test_finish_reason_length_without_usage_counts_max_tokens() -> None:
    # two tokens' text in one event, as some servers send it: counting events would give 3
    events = [{"choices": [{"text": "a", "finish_reason": None}]},
              {"choices": [{"text": "bc", "finish_reason": None}]},
              {"choices": [{"text": "d", "finish_reason": "length"}]}]
    backend = stream_backend(events)
    level = await run_level(backend, [BenchRequest("p", max_tokens=4)], 1, 1)
    assert level.records[0].output_tokens == 4 and level.records[0].streamed_tokens == 3
    assert level.mean_output_tokens == 4 and level.mean_streamed_tokens == 3
    await backend.aclose()


async def test_stop_without_usage_counts_the_stream_and_usage_wins_over_length() -> None:
    stopped = stream_backend([{"choices": [{"text": "a", "finish_reason": "stop"}]}])
    level = await run_level(stopped, [BenchRequest("p", max_tokens=4)], 1, 1)
    assert level.records[0].output_tokens == 1
    reported = stream_backend([{"choices": [{"text": "a", "finish_reason": "length"}]},
                               {"choices": [], "usage": {"completion_tokens": 7}}])
    level = await run_level(reported, [BenchRequest("p", max_tokens=4)], 1, 1)
    assert level.records[0].output_tokens == 7
    for backend in (stopped, reported):
        await backend.aclose()


async def test_extra_body_reaches_every_streamed_request() -> None:
    seen: list[dict[str, Any]] = []
    backend = stream_backend([{"choices": [{"text": "a"}]}], seen,
                             extra_body={"logit_bias": {"2": -1000.0}})
    await run_level(backend, [BenchRequest("p", max_tokens=1)], 1, 1)
    assert seen[0]["logit_bias"] == {"2": -1000.0} and seen[0]["ignore_eos"] is True
    await backend.aclose()


async def test_complete_sends_a_non_streamed_request() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if len(seen) == 2:
            return httpx.Response(400, json={"error": "bad"})
        return httpx.Response(200, json={"choices": [{"text": "x", "finish_reason": "length"}],
                                         "usage": {"completion_tokens": 5}})

    backend = OpenAIHTTPBackend("http://srv", "m", transport=httpx.MockTransport(handler))
    body = await backend.complete(BenchRequest("p", max_tokens=5))
    assert body["usage"]["completion_tokens"] == 5
    assert seen[0]["stream"] is False and "stream_options" not in seen[0]
    assert seen[0]["max_tokens"] == 5 and seen[0]["prompt"] == "p"
    with pytest.raises(Exception, match="HTTP 400"):
        await backend.complete(BenchRequest("p", max_tokens=5))
    await backend.aclose()


def run_json(rates: dict[int, float], ttft_c8: float, engine: bool = False) -> dict[str, Any]:
    levels = [{"concurrency": c, "output_throughput": r, "failed": 0,
               "ttft_ms": {"p50": ttft_c8 if c == 8 else 1.0}, "tpot_ms": {"p50": 9.0},
               "mean_output_tokens": 128.0, "mean_streamed_tokens": 127.0,
               "engine": ({"steps": 10, "batch_tokens_per_step": 8.0, "generated_per_step": 8.0,
                           "step_ms": {p: 1.0 for p in ("schedule", "batch_build", "decode",
                                                         "sample", "detokenize")},
                           "step_ms_total": 5.0} if engine else None)}
              for c, r in rates.items()]
    return {"sweep": {"levels": levels},
            "length_check": {"completion_tokens": 128, "finish_reason": "length"},
            "shared_prefix": {"first_ttft_ms": 1000.0, "later_ttft_mean_ms": 100.0,
                              "ratio": 10.0}}


def test_ratios_divide_lmserve_by_each_peer() -> None:
    runs = {"lmserve": run_json({1: 100.0, 8: 200.0}, 400.0),
            "peer": run_json({1: 50.0, 8: 400.0}, 800.0),
            "broken": {"error": "ServerStartError: exited"}}
    table = ratios(runs)
    assert table["peer"]["output_tok_s"] == {1: 2.0, 8: 0.5}
    assert table["peer"]["ttft_p50_c8"] == 0.5
    assert table["broken"] == {"output_tok_s": {}, "ttft_p50_c8": None}


def test_markdown_has_absolute_ratio_and_engine_tables() -> None:
    runs = {"lmserve": run_json({1: 100.0, 8: 200.0}, 400.0, engine=True),
            "peer": run_json({1: 50.0, 8: 400.0}, 800.0),
            "broken": {"error": "ServerStartError: exited"}}
    text = markdown("smollm2", runs)
    assert text.startswith("## smollm2")
    assert "| lmserve | 100.0 | 200.0 | 400 | 9.0 | 0 | 128 length; 128 (127 streamed) |" in text
    assert "| peer | 2.00 | 0.50 | 0.50 |" in text
    assert "| broken | **failed**: ServerStartError: exited |" in text
    assert "1000 / 100 (10.0x)" in text
    assert "| 1 | 10 | 8.0 | 8.00 | 1.000 |" in text and "peer: engine" not in text


def test_markdown_compares_each_lmserve_configuration_with_the_peers_only() -> None:
    runs = {"lmserve": run_json({1: 100.0, 8: 200.0}, 400.0),
            "lmserve-split": run_json({1: 100.0, 8: 400.0}, 400.0),
            "peer": run_json({1: 50.0, 8: 400.0}, 800.0)}
    text = markdown("smollm2", runs)
    default, split = text.split("Ratios lmserve / peer")[1].split("Ratios lmserve-split / peer")
    assert "| peer | 2.00 | 0.50 | 0.50 |" in default and "| lmserve-split |" not in default
    assert "| peer | 2.00 | 1.00 | 0.50 |" in split and "| lmserve |" not in split
