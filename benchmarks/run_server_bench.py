"""Server vs in-process ceiling, in one run: throughput sweep + shared-prefix TTFT.

    python benchmarks/run_server_bench.py [--model smollm2] [--parallel 8] [--threads 2]
                                          [--ctx 8192] [--kv-split] [--tag NAME]

Starts `lmserve serve` on a free loopback port, sweeps concurrency through HTTP with
`lmserve bench`'s harness, stops it, then drives the same model and settings in-process
(no HTTP) and reports server/ceiling ratios. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

from lmserve.bench.inprocess import InProcessBackend
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.procs import free_port, start_lmserve, stop
from lmserve.bench.report import format_shared_prefix, format_table, plot, to_json
from lmserve.bench.scenarios import shared_prefix, sweep
from lmserve.service import EngineSettings

RESULTS = Path(__file__).parent / "results"


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    return start_lmserve(args.model, port, "--parallel", str(args.parallel), "--threads",
                         str(args.threads), "--ctx", str(args.ctx),
                         *(["--kv-split"] if args.kv_split else []))


async def run(args: argparse.Namespace) -> dict:
    levels = [int(c) for c in args.concurrency.split(",")]
    kw = dict(concurrencies=levels, input_len=args.input_len, output_len=args.output_len,
              requests_per_level=args.requests_per_level)
    port = free_port()
    proc = start_server(args, port)
    try:
        http = OpenAIHTTPBackend(f"http://127.0.0.1:{port}", args.model, max_connections=max(levels))
        server = await sweep(http, **kw)
        prefix = await shared_prefix(http, prefix_len=1000, tail_len=32, output_len=16, n=4)
        await http.aclose()
    finally:
        stop(proc)
    settings = EngineSettings(n_ctx=args.ctx, parallel=args.parallel, threads=args.threads,
                              kv_split=args.kv_split)
    engine = await InProcessBackend.start(args.model, settings)
    try:
        ceiling = await sweep(engine, **kw)
    finally:
        await engine.aclose()
    return {"server": server, "ceiling": ceiling, "shared_prefix": prefix}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=8192,
                   help="context: the shared pool, or each slot's stream with --kv-split")
    p.add_argument("--kv-split", action="store_true", help="a KV stream per slot (both runs)")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests-per-level", type=int, default=None)
    p.add_argument("--tag", default="smollm2")
    args = p.parse_args()
    out = asyncio.run(run(args))
    server, ceiling, prefix = out["server"], out["ceiling"], out["shared_prefix"]
    print("== server (HTTP, /v1/completions, streaming)")
    print(format_table(server))
    print("== in-process ceiling (same engine settings, no HTTP)")
    print(format_table(ceiling))
    print("== shared 1000-token prefix (server)")
    print(format_shared_prefix(prefix))
    rows = []
    by_c = {lvl.concurrency: lvl for lvl in ceiling.levels}
    base = server.levels[0].output_throughput
    print("\nconcurrency  server tok/s  ceiling tok/s  server/ceiling  vs c=1")
    for lvl in server.levels:
        ref = by_c[lvl.concurrency].output_throughput
        ratio = lvl.output_throughput / ref if ref else 0.0
        rows.append({"concurrency": lvl.concurrency, "server": lvl.output_throughput,
                     "ceiling": ref, "ratio": ratio, "scaling": lvl.output_throughput / base})
        print(f"{lvl.concurrency:>11}  {lvl.output_throughput:>12.1f}  {ref:>13.1f}  "
              f"{ratio:>14.2f}  {lvl.output_throughput / base:>6.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"args": vars(args), "server": to_json(server), "ceiling": to_json(ceiling),
            "shared_prefix": prefix, "ratios": rows}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(data, indent=1))
    plot({"server": server, "in-process ceiling": ceiling}, RESULTS / f"{args.tag}.png")
    print(f"\nwrote {RESULTS / (args.tag + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
