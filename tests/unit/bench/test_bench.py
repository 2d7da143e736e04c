"""Pure-logic tests of the benchmark harness (no real server, no timing asserts)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import AsyncIterator

import httpx
import pytest

from lmserve.bench import (
    BackendError,
    BenchRequest,
    Chunk,
    LevelResult,
    OpenAIHTTPBackend,
    RequestRecord,
    Stats,
    SweepResult,
    format_table,
    from_json,
    make_prompts,
    percentile,
    plot,
    run_level,
    shared_prefix,
    sweep,
    to_json,
)
from lmserve.bench import cli, runner
from lmserve.bench.openai_http import SSEDecoder, api_root, parse_event


# --- fakes -------------------------------------------------------------------------------


class FakeClock:
    """Stands in for the `time` module inside the runner; the fake backend advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeBackend:
    """Yields req.max_tokens one-token chunks; fails on prompts containing `fail_on`."""

    name = "fake"

    def __init__(self, fail_on: tuple[str, ...] = (), clock: FakeClock | None = None) -> None:
        self.fail_on = fail_on
        self.clock = clock
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.closed = False

    async def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]:
        self.prompts.append(req.prompt)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for i in range(req.max_tokens):
                await asyncio.sleep(0)
                if i == 1 and any(marker in req.prompt for marker in self.fail_on):
                    raise BackendError("boom", 500)
                yield Chunk(n_tokens=1, text=f"t{i}")
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        self.closed = True


class ClockedBackend:
    """Sequential requests on a fake clock: TTFT 100 ms for the first, 10 ms after; ITL 5 ms."""

    name = "clocked"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0

    async def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]:
        self.clock.now += 0.100 if self.calls == 0 else 0.010
        self.calls += 1
        yield Chunk(1, "a")
        for _ in range(req.max_tokens - 1):
            self.clock.now += 0.005
            yield Chunk(1, "b")

    async def aclose(self) -> None:
        pass


# --- statistics --------------------------------------------------------------------------


def test_percentile_linear_interpolation() -> None:
    data = list(range(1, 11))
    assert percentile(data, 50) == pytest.approx(5.5)
    assert percentile(data, 0) == 1
    assert percentile(data, 100) == 10
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_stats_scale_and_empty() -> None:
    s = Stats.of([0.001, 0.002, 0.003, 0.010], scale=1000.0)
    assert s.count == 4
    assert s.mean == pytest.approx(4.0)
    assert s.p50 == pytest.approx(2.5)
    assert s.p99 == pytest.approx(9.79)
    assert Stats.of([]) == Stats(count=0, mean=None, p50=None, p99=None)


def test_itl_tpot_single_token_chunks() -> None:
    r = RequestRecord(start=0.0)
    for t in (1.0, 1.5, 2.5):
        r.on_chunk(Chunk(1, "x"), t)
    r.finish(2.5)
    assert r.ok and r.ttft == 1.0
    assert r.itl == pytest.approx([0.5, 1.0])
    assert r.output_tokens == 3
    assert r.tpot == pytest.approx(0.75)


def test_itl_splits_multi_token_chunks() -> None:
    r = RequestRecord(start=0.0)
    r.on_chunk(Chunk(2, "ab"), 1.0)  # first chunk with 2 tokens: no gap for its second
    r.on_chunk(Chunk(1, "c"), 1.5)
    r.on_chunk(Chunk(0, ""), 1.7)  # no tokens: not a timing event
    r.on_chunk(Chunk(3, "def"), 3.0)
    r.finish(3.0)
    assert r.ttft == 1.0
    assert r.itl == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert r.output_tokens == 6
    assert r.tpot == pytest.approx(2.0 / 5)


def test_usage_chunk_overrides_token_count_without_timing() -> None:
    r = RequestRecord(start=0.0)
    r.on_chunk(Chunk(1, "a"), 1.0)
    r.on_chunk(Chunk(1, "bc"), 2.0)
    r.on_chunk(Chunk(0, "", total_tokens=5, prompt_tokens=12), 9.0)
    r.finish(3.0)
    assert r.output_tokens == 5 and r.prompt_tokens == 12
    assert r.itl == [1.0]
    assert r.tpot == pytest.approx(0.5)


def test_tpot_needs_two_tokens_and_errors_are_not_ok() -> None:
    r = RequestRecord(start=0.0)
    r.on_chunk(Chunk(1, "a"), 1.0)
    r.finish(1.0)
    assert r.tpot is None
    bad = RequestRecord(start=0.0)
    bad.finish(0.5, error="BackendError: boom")
    assert not bad.ok and bad.ttft is None


def test_level_result_excludes_failed_requests() -> None:
    good = RequestRecord(start=0.0)
    good.on_chunk(Chunk(1, "a"), 0.2)
    good.on_chunk(Chunk(1, "b"), 0.4)
    good.finish(0.4)
    bad = RequestRecord(start=0.0)
    bad.on_chunk(Chunk(1, "a"), 0.1)
    bad.finish(0.3, error="HTTP 500")
    level = LevelResult.from_records(2, [good, bad, bad], duration_s=2.0)
    assert (level.completed, level.failed, level.num_requests) == (1, 2, 3)
    assert level.request_throughput == pytest.approx(0.5)
    assert level.output_throughput == pytest.approx(1.0)
    assert level.ttft.mean == pytest.approx(200.0)
    assert level.errors == ["HTTP 500"]


# --- prompts -----------------------------------------------------------------------------


def test_make_prompts_unique_and_sized() -> None:
    prompts = make_prompts(50, 64, max_tokens=7)
    assert len({p.prompt for p in prompts}) == 50
    assert all(len(p.prompt.split()) == 64 for p in prompts)
    assert all(p.max_tokens == 7 and p.ignore_eos for p in prompts)
    assert prompts[17].prompt.startswith("Request 17: ")
    assert make_prompts(3, 20, seed=5) == make_prompts(3, 20, seed=5)
    later = make_prompts(2, 20, first_index=50)
    assert later[0].prompt.startswith("Request 50: ")
    plain = make_prompts(2, 10, unique_prefix=False, tokenizer_words=["w"])
    assert plain[0].prompt == " ".join(["w"] * 10)


def test_make_prompts_shared_prefix_structure() -> None:
    prompts = make_prompts(4, 110, shared_prefix_len=100, seed=3)
    split = [p.prompt.split() for p in prompts]
    prefixes = {tuple(words[:100]) for words in split}
    assert len(prefixes) == 1
    tails = [words[100:] for words in split]
    assert [t[:2] for t in tails] == [["Request", f"{i}:"] for i in range(4)]
    assert all(len(words) == 110 for words in split)
    assert len({p.prompt for p in prompts}) == 4
    other = make_prompts(1, 110, shared_prefix_len=100, seed=4)[0].prompt.split()[:100]
    assert tuple(other) not in prefixes


# --- runner ------------------------------------------------------------------------------


async def test_run_level_counts_and_concurrency_limit() -> None:
    backend = FakeBackend()
    prompts = make_prompts(20, 8, max_tokens=5)
    level = await run_level(backend, prompts, concurrency=3, num_requests=20)
    assert (level.completed, level.failed, level.num_requests) == (20, 0, 20)
    assert backend.max_in_flight == 3
    assert sorted(backend.prompts) == sorted(p.prompt for p in prompts)
    assert all(r.output_tokens == 5 and len(r.itl) == 4 for r in level.records)
    assert level.itl.count == 80 and level.tpot.count == 20
    assert level.output_throughput > 0


async def test_run_level_more_workers_than_requests_and_reuse() -> None:
    backend = FakeBackend()
    level = await run_level(backend, make_prompts(2, 8, max_tokens=2), 8, 5)
    assert level.completed == 5
    assert backend.max_in_flight <= 5
    assert len(set(backend.prompts)) == 2  # prompts are cycled


async def test_run_level_records_failures() -> None:
    backend = FakeBackend(fail_on=("Request 1:", "Request 4:"))
    level = await run_level(backend, make_prompts(6, 8, max_tokens=4), 2, 6)
    assert (level.completed, level.failed) == (4, 2)
    assert level.errors == ["BackendError: boom"]
    assert backend.in_flight == 0
    assert level.ttft.count == 4


async def test_run_level_exact_metrics_on_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(runner, "time", clock)
    level = await run_level(ClockedBackend(clock), make_prompts(3, 8, max_tokens=5), 1, 3)
    assert level.ttft.p50 == pytest.approx(10.0) and level.ttft.mean == pytest.approx(40.0)
    assert level.itl.mean == pytest.approx(5.0) and level.itl.p99 == pytest.approx(5.0)
    assert level.tpot.p50 == pytest.approx(5.0)
    assert level.duration_s == pytest.approx(0.180)
    assert level.output_throughput == pytest.approx(15 / 0.180)


async def test_runner_accepts_coroutine_returning_iterator() -> None:
    class CoroBackend:
        name = "coro"

        async def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]:
            async def gen() -> AsyncIterator[Chunk]:
                yield Chunk(2, "ab")

            return gen()

        async def aclose(self) -> None:
            pass

    level = await run_level(CoroBackend(), make_prompts(1, 4), 1, 2)  # type: ignore[arg-type]
    assert level.completed == 2 and level.records[0].output_tokens == 2


async def test_sweep_levels_and_unique_prompts() -> None:
    backend = FakeBackend()
    result = await sweep(backend, concurrencies=(1, 4), input_len=16, output_len=3, warmup=2)
    assert [lv.concurrency for lv in result.levels] == [1, 4]
    assert [lv.num_requests for lv in result.levels] == [4, 8]
    assert len(backend.prompts) == 2 + 4 + 8 == len(set(backend.prompts))
    assert result.failed == 0


async def test_shared_prefix_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(runner, "time", clock)
    report = await shared_prefix(ClockedBackend(clock), prefix_len=50, tail_len=8, n=4)
    assert report["ttft_ms"] == pytest.approx([100.0, 10.0, 10.0, 10.0])
    assert report["ratio"] == pytest.approx(10.0)
    assert report["failed"] == 0


# --- OpenAI HTTP backend -----------------------------------------------------------------


def sse_response(events: list[str], split: int = 7) -> httpx.Response:
    """A streaming SSE response whose bytes arrive in awkward `split`-byte pieces."""
    raw = "".join(events).encode()

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), split):
            await asyncio.sleep(0)
            yield raw[i : i + split]

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


def completion_events() -> list[str]:
    ev = lambda obj: f"data: {json.dumps(obj)}\n\n"  # noqa: E731
    return [
        ": keep-alive\n\n",
        ev({"choices": [{"index": 0, "text": "Hel"}]}),
        ev({"choices": [{"index": 0, "text": ""}]}),
        ev({"choices": [{"index": 0, "text": "lo é"}]}),
        ev({"choices": [{"index": 0, "text": "!", "finish_reason": "length"}]}),
        ev({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}),
        "data: [DONE]\n\n",
    ]


async def test_openai_completions_stream_and_request_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_response(completion_events())

    backend = OpenAIHTTPBackend(
        "http://srv:8080/", "m1", api_key="k", transport=httpx.MockTransport(handler)
    )
    chunks = [c async for c in backend.stream(BenchRequest("hi there", max_tokens=4))]
    await backend.aclose()
    assert [c.text for c in chunks[:3]] == ["Hel", "lo é", "!"]
    assert all(c.n_tokens == 1 and not c.is_usage for c in chunks[:3])
    assert chunks[3] == Chunk(0, "", total_tokens=4, prompt_tokens=9)
    req = seen[0]
    assert req.url.path == "/v1/completions"
    assert req.headers["authorization"] == "Bearer k"
    body = json.loads(req.content)
    assert body == {
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 4,
        "model": "m1",
        "ignore_eos": True,
        "prompt": "hi there",
    }


async def test_openai_chat_stream_without_done_or_usage() -> None:
    events = [
        'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',
        'data: {"choices":[{"delta":{"content":"A"}}]}\n\n',
        'data: {"choices":[{"delta":{"content":"B"}}]}',  # no final blank line, no [DONE]
    ]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_response(events, split=5)

    backend = OpenAIHTTPBackend(
        "http://srv/v1", None, endpoint="chat", transport=httpx.MockTransport(handler)
    )
    req = BenchRequest("q", max_tokens=2, ignore_eos=False)
    chunks = [c async for c in backend.stream(req)]
    await backend.aclose()
    assert [c.text for c in chunks] == ["A", "B"]
    assert seen[0].url.path == "/v1/chat/completions"
    body = json.loads(seen[0].content)
    assert body["messages"] == [{"role": "user", "content": "q"}]
    assert "model" not in body and "ignore_eos" not in body
    assert "authorization" not in seen[0].headers


async def test_openai_http_error_is_a_failed_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "loading"}})

    backend = OpenAIHTTPBackend("http://srv", "m", transport=httpx.MockTransport(handler))
    with pytest.raises(BackendError) as info:
        async for _ in backend.stream(BenchRequest("x", 2)):
            pass
    assert info.value.status == 503 and "loading" in str(info.value)
    level = await run_level(backend, [BenchRequest("x", 2)], 2, 3)
    await backend.aclose()
    assert (level.completed, level.failed) == (0, 3)
    assert level.errors[0].startswith("BackendError: HTTP 503")


async def test_openai_error_event_and_list_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "qwen"}, {"id": "other"}]})
        return sse_response(['data: {"choices":[{"text":"a"}]}\n\n', 'data: {"error":"oom"}\n\n'])

    backend = OpenAIHTTPBackend("http://srv", None, transport=httpx.MockTransport(handler))
    assert await backend.list_models() == ["qwen", "other"]
    level = await run_level(backend, [BenchRequest("x", 2)], 1, 1)
    await backend.aclose()
    assert level.failed == 1 and "oom" in level.errors[0]


def test_sse_decoder_and_helpers() -> None:
    dec = SSEDecoder()
    assert dec.feed("event: message") is None
    assert dec.feed("data: line1") is None
    assert dec.feed("data:line2") is None
    assert dec.feed("") == "line1\nline2"
    assert dec.feed("") is None
    assert parse_event('{"choices":[{"text":"x"}],"usage":null}', "completions") == ("x", None)
    assert parse_event('{"choices":[{"delta":{"reasoning_content":"r"}}]}', "chat")[0] == "r"
    with pytest.raises(BackendError):
        parse_event("not json", "chat")
    assert api_root("http://h:1") == api_root("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(ValueError):
        OpenAIHTTPBackend("http://h", "m", endpoint="embeddings")  # type: ignore[arg-type]


# --- reporting and CLI -------------------------------------------------------------------


async def _small_sweep() -> SweepResult:
    return await sweep(FakeBackend(), concurrencies=(1, 2), input_len=8, output_len=3, warmup=0)


async def test_table_json_round_trip_and_plot(tmp_path) -> None:
    result = await _small_sweep()
    result.levels.append(LevelResult.from_records(4, [], 0.0))  # an empty level: None stats
    table = format_table(result)
    assert "TTFT mean" in table and len(table.splitlines()) == 3 + 3
    data = json.loads(json.dumps(to_json(result, include_requests=True)))
    assert len(data["levels"][0]["requests"]) == 4
    back = from_json(data)
    assert [lv.completed for lv in back.levels] == [4, 4, 0]
    assert back.levels[1].ttft == result.levels[1].ttft
    path = plot({"server": result, "copy": back}, tmp_path / "bench.png")
    raw = path.read_bytes()
    assert raw.startswith(b"\x89PNG") and len(raw) > 1000


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_main_with_registered_backend(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[FakeBackend] = []

    async def factory(args: argparse.Namespace) -> FakeBackend:
        made.append(FakeBackend(fail_on=tuple(args.fail_on)))
        return made[-1]

    monkeypatch.setitem(cli.BACKENDS, "fake", factory)
    argv = ["--backend", "fake", "--concurrency", "1,3", "--input-len", "8", "--output-len", "2"]
    args = _parse(argv + ["--json", str(tmp_path / "r.json"), "--shared-prefix"])
    args.fail_on = []
    assert cli.main(args) == 0
    assert made[0].closed
    out = capsys.readouterr().out
    assert "shared prefix" in out and "TPOT mean" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [lv["concurrency"] for lv in saved["levels"]] == [1, 3]

    args = _parse(argv + ["--plot", str(tmp_path / "p.png"), "--compare", f"old={tmp_path}/r.json"])
    args.fail_on = ["Request 2:"]
    assert cli.main(args) == 1
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_argument_errors() -> None:
    with pytest.raises(SystemExit):
        _parse(["--concurrency", "1,x"])
    with pytest.raises(SystemExit):
        _parse(["--concurrency", "0"])
    args = _parse(["--backend", "nope"])
    assert args.concurrency == [1, 2, 4, 8, 16] and args.endpoint == "completions"
    assert cli.main(args) == 2
    assert "openai" in cli.BACKENDS
