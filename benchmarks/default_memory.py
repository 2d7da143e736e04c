"""Resident memory of lmserve's default against llama-server at the same context and parallelism.

    python -m benchmarks.default_memory [--model smollm2] [--threads 2] [--rounds 3]

Starts, one after another, `lmserve serve MODEL` with its defaults (and with the defaults
before session 8: --ctx 8192 --cache-slots 8) and llama-server with the same room per sequence
and the same slots (-c parallel x ctx -np parallel, a KV stream per slot, as lmserve's auto
layout gives these models). Each gets `parallel` concurrent chat requests of 64 tokens twice,
so every slot has run, then its VmRSS is read. Rounds repeat the sequence and the medians are
reported. llama-server comes from benchmarks/peers (install_peers.sh). Results go to
benchmarks/results/default-memory-<model>.json and .md.
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

import httpx

from benchmarks.harness.procs import free_port, start_process, stop, wait_ready
from benchmarks.peers.servers import llama_server_binary
from benchmarks.server_variants import rss_bytes
from lmserve.engine import kv_layout
from lmserve.models.resolve import resolve

RESULTS = Path(__file__).parent / "results"
PARALLEL = 8  # lmserve's default --parallel


def lmserve_cmd(model: str, port: int, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmserve", "serve", model, "--port", str(port), "--threads",
            str(threads), "--store", "memory", "--log-level", "warning", *extra]


def llama_server_cmd(path: str, port: int, threads: int, ctx: int) -> list[str]:
    return [llama_server_binary(), "-m", path, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(PARALLEL),
            "-c", str(PARALLEL * ctx), "--no-webui"]


async def exercise(url: str, model: str) -> None:
    """`PARALLEL` concurrent chats, twice, so that every slot has decoded."""
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(2):
            await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json={
                "model": model, "max_tokens": 64, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]})
                for i in range(PARALLEL)))


def measure(cmd: list[str], port: int, model: str) -> int:
    proc: subprocess.Popen[bytes] = start_process(cmd)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health")
        asyncio.run(exercise(f"http://127.0.0.1:{port}", model))
        rss = rss_bytes(proc.pid)
        if rss is None:
            raise RuntimeError("no VmRSS (not Linux?)")
        return rss
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    path = resolve(args.model).path
    # The default's context for this model (its training context, capped), and the old one.
    from lmserve.engine.runner import read_info

    train = read_info(path).n_ctx_train
    new_ctx, old_ctx = kv_layout.default_ctx(train), min(train or 4096, 8192)
    runs: dict[str, list[int]] = {}
    configs = {
        "lmserve default": ("lmserve", ()),
        "llama-server, same ctx and slots": ("llama", new_ctx),
        "lmserve default before session 8 (--ctx 8192 --cache-slots 8)":
            ("lmserve", ("--ctx", str(old_ctx), "--cache-slots", str(PARALLEL))),
        f"llama-server, -c {PARALLEL}x{old_ctx} -np {PARALLEL}": ("llama", old_ctx),
    }
    for r in range(args.rounds):
        for name, (kind, extra) in configs.items():
            port = free_port()
            cmd = lmserve_cmd(args.model, port, args.threads, *extra) if kind == "lmserve" \
                else llama_server_cmd(path, port, args.threads, int(extra))  # type: ignore[arg-type]
            rss = measure(cmd, port, args.model)
            runs.setdefault(name, []).append(rss)
            print(f"round {r + 1}: {name}: {rss / 2**20:.0f} MiB", file=sys.stderr)
    med = {name: statistics.median(v) for name, v in runs.items()}
    names = list(configs)
    rows: list[dict[str, Any]] = [{"server": n, "rss_mib": round(med[n] / 2**20),
                                   "rss_per_round_mib": [round(v / 2**20) for v in runs[n]]}
                                  for n in names]
    ratios = {"default / llama-server": med[names[0]] / med[names[1]],
              "old default / llama-server": med[names[2]] / med[names[3]],
              "default / old default": med[names[0]] / med[names[2]]}
    lines = [f"model {args.model} ({path}), {PARALLEL} parallel, threads {args.threads}, "
             f"context per sequence {new_ctx} (default) and {old_ctx} (before); "
             f"median VmRSS of {args.rounds} rounds after every slot ran", "",
             "| server | RSS (MiB) | per round |", "|---|---|---|"]
    lines += [f"| {r['server']} | {r['rss_mib']} | {r['rss_per_round_mib']} |" for r in rows]
    lines += ["", *(f"- {k}: {v:.2f}x" for k, v in ratios.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"default-memory-{args.model}"
    out.with_suffix(".json").write_text(json.dumps(
        {"settings": vars(args), "context": {"default": new_ctx, "before": old_ctx},
         "servers": rows, "ratios": ratios}, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
