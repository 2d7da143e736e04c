"""The cost of one hop: lmserve serving a model of an upstream server (`--upstream`) against
that upstream alone.

    python -m benchmarks.upstream_hop [--model smollm2] [--concurrency 1,16] [--rounds 5]
                                      [--input-len 128] [--output-len 64] [--parallel 16]
                                      [--threads 2] [--endpoint chat|completions] [--tag NAME]

Starts an lmserve with the model (the upstream) and a second lmserve with no model of its own
that serves it over `--upstream` (the front), both on loopback. Both are driven by the same
OpenAI streaming client; every concurrency level is run against each in turn, the order
swapped at every level and round (benchmarks.harness.paired), so the VM's drift hits both
alike; each request has its own prompt, so neither profits from the other's prefix cache.
Reported per level, as medians over rounds of within-round figures: TTFT p50 of each and the
front's extra (ms), output tokens/s of each and the front's ratio. Targets: +5 ms TTFT or less
at c=1, a throughput ratio of 0.97 or more at c=16. Results go to
benchmarks/results/<tag>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness.paired import Round, take_turns
from benchmarks.harness.procs import free_port, start_lmserve, start_process, stop, wait_ready
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.stats import LevelResult

RESULTS = Path(__file__).parent / "results"
UPSTREAM, FRONT = "upstream", "front"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", default="1,16",
                   help="comma-separated concurrency levels (default 1,16)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(4, 2 x concurrency))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--parallel", type=int, default=16, help="the upstream's --parallel")
    p.add_argument("--ctx", type=int, default=2048, help="the upstream's --ctx")
    p.add_argument("--threads", type=int, default=2, help="the upstream's --threads")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--tag", default="upstream-hop")
    return p.parse_args(argv)


def level_row(rounds: list[Round], c: int) -> dict[str, Any]:
    """Within-round figures at concurrency c, as medians over rounds."""
    def each(name: str, pick: Any) -> list[float]:
        return [pick(r[name][c]) for r in rounds if pick(r[name][c]) is not None]

    def ttft(level: LevelResult) -> float | None:
        return level.ttft.p50

    extra = [f.ttft.p50 - u.ttft.p50 for f, u in ((r[FRONT][c], r[UPSTREAM][c]) for r in rounds)
             if f.ttft.p50 is not None and u.ttft.p50 is not None]
    ratio = [r[FRONT][c].output_throughput / r[UPSTREAM][c].output_throughput for r in rounds
             if r[UPSTREAM][c].output_throughput > 0]
    failed = sum(r[name][c].failed for r in rounds for name in (UPSTREAM, FRONT))
    return {
        "concurrency": c,
        "ttft_p50_ms": {name: statistics.median(each(name, ttft)) for name in (UPSTREAM, FRONT)},
        "ttft_extra_ms": {"median": statistics.median(extra), "per_round": extra},
        "tokens_per_s": {name: statistics.median(each(name, lambda lv: lv.output_throughput))
                         for name in (UPSTREAM, FRONT)},
        "throughput_ratio": {"median": statistics.median(ratio), "per_round": ratio},
        "failed_requests": failed,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["   c | TTFT p50 upstream | front  | extra (ms) | tok/s upstream | front   | ratio",
             "-----+-------------------+--------+------------+----------------+---------+------"]
    for row in rows:
        t, s = row["ttft_p50_ms"], row["tokens_per_s"]
        lines.append(f"{row['concurrency']:>4} | {t[UPSTREAM]:>17.1f} | {t[FRONT]:>6.1f} | "
                     f"{row['ttft_extra_ms']['median']:>+10.2f} | {s[UPSTREAM]:>14.1f} | "
                     f"{s[FRONT]:>7.1f} | {row['throughput_ratio']['median']:.3f}")
    return "\n".join(lines)


async def measure(args: argparse.Namespace, upstream_url: str, front_url: str
                  ) -> list[Round]:
    levels = [int(c) for c in args.concurrency.split(",")]
    clients = max(levels)
    backends = {name: OpenAIHTTPBackend(url, args.model, endpoint=args.endpoint,
                                        max_connections=clients)
                for name, url in ((UPSTREAM, upstream_url), (FRONT, front_url))}

    def progress(r: int, name: str, level: LevelResult) -> None:
        print(f"round {r + 1}/{args.rounds} c={level.concurrency:<3} {name:<8} "
              f"TTFT p50 {level.ttft.p50 or 0:7.1f} ms  {level.output_throughput:7.1f} tok/s"
              f"  failed {level.failed}", file=sys.stderr)

    try:
        # one warm-up level each, not counted: connections, the upstream's first prefill
        await take_turns(backends, levels[:1], rounds=1, input_len=args.input_len,
                         output_len=8, requests_per_level=2)
        return await take_turns(backends, levels, rounds=args.rounds,
                                input_len=args.input_len, output_len=args.output_len,
                                requests_per_level=args.requests, on_level=progress)
    finally:
        for backend in backends.values():
            await backend.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    up_port, front_port = free_port(), free_port()
    upstream = start_lmserve(args.model, up_port, "--parallel", str(args.parallel),
                             "--ctx", str(args.ctx), "--threads", str(args.threads),
                             "--threads-batch", str(args.threads))
    front = None
    try:
        front = start_process([sys.executable, "-m", "lmserve", "serve", "--upstream",
                               f"{args.model}=http://127.0.0.1:{up_port}/v1", "--port",
                               str(front_port), "--log-level", "warning"])
        wait_ready(front, f"http://127.0.0.1:{front_port}/health")
        rounds = asyncio.run(measure(args, f"http://127.0.0.1:{up_port}",
                                     f"http://127.0.0.1:{front_port}"))
    finally:
        if front is not None:
            stop(front)
        stop(upstream)
    rows = [level_row(rounds, c) for c in (int(c) for c in args.concurrency.split(","))]
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.tag}.json"
    out.write_text(json.dumps({"settings": vars(args), "levels": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
