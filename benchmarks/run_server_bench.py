"""Server vs in-process ceiling, in one run: throughput sweep + shared-prefix TTFT.

    python -m benchmarks.run_server_bench [--model smollm2] [--parallel 8] [--threads 2]
                                          [--ctx 8192] [--kv-layout auto|split|shared]
                                          [--rounds 3] [--tag NAME]

Starts `lmserve serve` on a free loopback port and loads the same model with the same
settings in this process (no HTTP), both at once: an idle one uses no CPU. Then, round after
round, every concurrency level is run by both in turn, the order swapped each level and each
round (benchmarks.harness.paired). This VM's speed drifts by up to about 30% over minutes, so
ratios are taken within a round (server/ceiling at a level, and each one's level against its
own c=1), and reported as medians over rounds. The server's per-step engine timings come from
its /metrics. Results go to benchmarks/results/<tag>.json and .png (the plot shows each level's
median round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness.engine_metrics import MetricsProbe
from benchmarks.harness.paired import Round, take_turns
from benchmarks.harness.procs import free_port, start_lmserve, stop
from lmserve.bench.inprocess import InProcessBackend
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.prompts import make_prompts
from lmserve.bench.report import format_shared_prefix, format_table, plot, to_json
from lmserve.bench.runner import run_level
from lmserve.bench.scenarios import SweepResult, shared_prefix
from lmserve.service import EngineSettings

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("server", "ceiling")


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    return start_lmserve(args.model, port, "--parallel", str(args.parallel), "--threads",
                         str(args.threads), "--ctx", str(args.ctx),
                         "--kv-layout", args.kv_layout)


def summarize(rounds: list[Round]) -> list[dict[str, Any]]:
    """Per level: medians over rounds of tok/s, server/ceiling and each one's scaling."""
    rows = []
    for c in rounds[0]["server"]:
        def tok_s(r: Round, name: str, level: int = c) -> float:
            return r[name][level].output_throughput
        rows.append({
            "concurrency": c,
            "server": statistics.median(tok_s(r, "server") for r in rounds),
            "ceiling": statistics.median(tok_s(r, "ceiling") for r in rounds),
            "ratio": statistics.median(tok_s(r, "server") / tok_s(r, "ceiling") for r in rounds),
            "ratios": [tok_s(r, "server") / tok_s(r, "ceiling") for r in rounds],
            "scaling": statistics.median(tok_s(r, "server") / tok_s(r, "server", 1)
                                         for r in rounds),
            "ceiling_scaling": statistics.median(tok_s(r, "ceiling") / tok_s(r, "ceiling", 1)
                                                 for r in rounds),
        })
    return rows


def median_sweep(rounds: list[Round], name: str,
                 args: argparse.Namespace) -> SweepResult:
    """A sweep made of each level's median round (by tok/s), for the tables and the plot."""
    sweep = SweepResult(backend=name, input_len=args.input_len, output_len=args.output_len)
    for c in rounds[0][name]:
        ranked = sorted((r[name][c] for r in rounds), key=lambda lvl: lvl.output_throughput)
        sweep.levels.append(ranked[len(ranked) // 2])
    return sweep


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = start_server(args, port)
    settings = EngineSettings(n_ctx=args.ctx, parallel=args.parallel, threads=args.threads,
                              kv_layout=args.kv_layout)
    engine = await InProcessBackend.start(args.model, settings)
    layout = engine.service.layout.reason
    print(f"KV layout: {layout}", flush=True)
    http = OpenAIHTTPBackend(f"http://127.0.0.1:{port}", args.model, max_connections=64)
    probe = MetricsProbe(f"http://127.0.0.1:{port}")
    try:
        warm = make_prompts(2, args.input_len, max_tokens=args.output_len, first_index=10**6)
        await run_level(http, warm[:1], 1, 1)
        await run_level(engine, warm[1:], 1, 1)
        rounds = await take_turns(
            {"server": http, "ceiling": engine}, [int(c) for c in args.concurrency.split(",")],
            rounds=args.rounds, input_len=args.input_len, output_len=args.output_len,
            requests_per_level=args.requests_per_level, probes={"server": probe},
            on_level=lambda r, name, level: print(
                f"round {r + 1} c={level.concurrency:<2} {name:7s} "
                f"{level.output_throughput:6.1f} tok/s  {level.failed} failed", flush=True))
        prefix = await shared_prefix(http, prefix_len=1000, tail_len=32, output_len=16, n=4)
    finally:
        await probe.aclose()
        await http.aclose()
        stop(proc)
        await engine.aclose()
    return {"rounds": rounds, "shared_prefix": prefix, "kv_layout": layout}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=8192,
                   help="context: the shared pool, or each slot's stream when split")
    p.add_argument("--kv-layout", choices=["auto", "split", "shared"], default="auto",
                   help="the KV layout of both runs (lmserve serve --kv-layout)")
    p.add_argument("--kv-split", dest="kv_layout", action="store_const", const="split",
                   help="the same as --kv-layout split")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="must include 1")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests-per-level", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default="smollm2")
    args = p.parse_args()
    if "1" not in args.concurrency.split(","):
        p.error("--concurrency must include 1 (the scaling baseline)")
    out = asyncio.run(run(args))
    rounds, prefix = out["rounds"], out["shared_prefix"]
    server, ceiling = (median_sweep(rounds, name, args) for name in BACKENDS)
    print("== server (HTTP, /v1/completions, streaming; each level's median round)")
    print(format_table(server))
    print("== in-process ceiling (same engine settings, no HTTP)")
    print(format_table(ceiling))
    print("== shared 1000-token prefix (server)")
    print(format_shared_prefix(prefix))
    rows = summarize(rounds)
    print(f"\nmedians over {args.rounds} rounds of per-round figures")
    print("concurrency  server tok/s  ceiling tok/s  server/ceiling  server vs c=1  "
          "ceiling vs c=1")
    for row in rows:
        print(f"{row['concurrency']:>11}  {row['server']:>12.1f}  {row['ceiling']:>13.1f}  "
              f"{row['ratio']:>14.2f}  {row['scaling']:>12.2f}x  {row['ceiling_scaling']:>13.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"args": vars(args), "server": to_json(server), "ceiling": to_json(ceiling),
            "rounds": [{name: to_json(SweepResult(name, args.input_len, args.output_len,
                                                  list(r[name].values())))
                        for name in BACKENDS} for r in rounds],
            "shared_prefix": prefix, "kv_layout": out["kv_layout"], "ratios": rows}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(data, indent=1))
    plot({"server": server, "in-process ceiling": ceiling}, RESULTS / f"{args.tag}.png")
    print(f"\nwrote {RESULTS / (args.tag + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
