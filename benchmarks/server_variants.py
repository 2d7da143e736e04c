"""lmserve against itself with other flags: KV cache types, GPU offload, or any serve option.

    python -m benchmarks.server_variants --model smollm2 \\
        --variant f16= --variant "q8_0=--cache-type-k q8_0 --cache-type-v q8_0" \\
        [--concurrency 1,8] [--rounds 3] [--parallel 8] [--ctx 4096] [--threads 2] \\
        [--input-len 128] [--output-len 128] [--tag NAME]

Every variant is an `lmserve serve MODEL` of its own with the common flags plus its own; all
run at once on loopback (an idle one takes no CPU) and take turns level by level, the order
rotated every level and round (benchmarks.harness.paired), so the VM's drift hits them alike.
Each request has its own prompt. Reported per level: output tokens/s of each variant (median
over rounds) and its ratio to the first variant (median of per-round ratios). Per variant, at
rest after the rounds: the resident memory of the server process (VmRSS) and where the model
card says the weights and the KV cache live (KV bytes, bytes per cell, GPU layers). Results go
to benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.paired import Round, take_turns
from benchmarks.harness.procs import free_port, start_lmserve, stop
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.stats import LevelResult

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                   help="a server variant: its name and its own serve flags (repeatable; "
                        "the first is the baseline)")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(4, 2 x concurrency))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--parallel", type=int, default=None,
                   help="every variant's --parallel (default: lmserve's, 8)")
    p.add_argument("--ctx", type=int, default=None,
                   help="every variant's --ctx (default: lmserve's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="server-variants")
    return p.parse_args(argv)


def variants(specs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in out:
            raise SystemExit(f"--variant {spec!r}: expected a new NAME=FLAGS")
        out[name] = shlex.split(flags)
    return out


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process (Linux), in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def card_facts(url: str, model: str) -> dict[str, Any]:
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json().get("meta", {})
    place = meta.get("placement") or {}
    return {"kv_layout": meta.get("kv_layout"), "placement": place,
            "weights_bytes": meta.get("size")}


def kv_cells(url: str, model: str) -> int | None:
    """The KV cache's cells: the plan of the running engine says its layout, slots and
    context."""
    plan = httpx.post(f"{url}/v1/plan", timeout=30,
                      json={"runtime": {"model_reference": model}}).json()
    memory = plan.get("runtime_plan", {}).get("memory", {})
    per_cell = memory.get("kv_bytes_per_token")
    return memory["kv_cache_bytes"] // per_cell if per_cell else None


def level_row(rounds: list[Round], names: list[str], c: int) -> dict[str, Any]:
    base = names[0]
    tok_s = {n: statistics.median(r[n][c].output_throughput for r in rounds) for n in names}
    ratios = {n: [r[n][c].output_throughput / r[base][c].output_throughput for r in rounds
                  if r[base][c].output_throughput > 0] for n in names[1:]}
    return {"concurrency": c, "tokens_per_s": tok_s,
            "ratio_to_" + base: {n: {"median": statistics.median(v), "per_round": v}
                                 for n, v in ratios.items() if v},
            "failed_requests": {n: sum(r[n][c].failed for r in rounds) for n in names}}


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]],
             facts: dict[str, dict[str, Any]]) -> str:
    names = list(facts)
    base = names[0]
    lines = [f"model {args.model}, --parallel {args.parallel or 'default'} --ctx "
             f"{args.ctx or 'default'} --threads {args.threads}, {args.input_len} prompt / "
             f"{args.output_len} output tokens, "
             f"{args.rounds} paired rounds", "",
             "| variant | flags | RSS (MiB) | KV (MiB) | KV bytes/cell | weights | " +
             " | ".join(f"tok/s c={r['concurrency']}" for r in rows) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(rows)]
    for n in names:
        f = facts[n]
        place = f["placement"]
        cells = f.get("kv_cells") or 0
        per_cell = round(place.get("kv_bytes", 0) / cells) if cells else "?"
        cols = []
        for r in rows:
            ratio = r["ratio_to_" + base].get(n)
            cols.append(f"{r['tokens_per_s'][n]:.1f}" +
                        (f" ({ratio['median']:.2f}x)" if ratio else ""))
        lines.append(f"| {n} | `{f['flags'] or '(none)'}` | "
                     f"{(f['rss_bytes'] or 0) / 2**20:.0f} | "
                     f"{place.get('kv_bytes', 0) / 2**20:.1f} | {per_cell} | "
                     f"{place.get('where', '?')} ({place.get('gpu_layers', 0)} layers) | " +
                     " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


async def measure(args: argparse.Namespace, urls: dict[str, str]) -> list[Round]:
    levels = [int(c) for c in args.concurrency.split(",")]
    backends = {n: OpenAIHTTPBackend(u, args.model, max_connections=max(levels))
                for n, u in urls.items()}

    def progress(r: int, name: str, level: LevelResult) -> None:
        print(f"round {r + 1}/{args.rounds} c={level.concurrency:<3} {name:<10} "
              f"{level.output_throughput:7.1f} tok/s  failed {level.failed}", file=sys.stderr)

    try:
        await take_turns(backends, levels[:1], rounds=1, input_len=args.input_len,
                         output_len=8, requests_per_level=2)  # warm-up, not counted
        return await take_turns(backends, levels, rounds=args.rounds, input_len=args.input_len,
                                output_len=args.output_len, requests_per_level=args.requests,
                                on_level=progress)
    finally:
        for backend in backends.values():
            await backend.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = variants(args.variant)
    common = ["--threads", str(args.threads), "--store", "memory"]
    for flag, value in (("--parallel", args.parallel), ("--ctx", args.ctx)):
        if value is not None:
            common += [flag, str(value)]
    procs, urls = {}, {}
    try:
        for name, flags in chosen.items():
            port = free_port()
            procs[name] = start_lmserve(args.model, port, *common, *flags)
            urls[name] = f"http://127.0.0.1:{port}"
        rounds = asyncio.run(measure(args, urls))
        facts = {}
        for name, proc in procs.items():
            facts[name] = {"flags": " ".join(chosen[name]), "rss_bytes": rss_bytes(proc.pid),
                           **card_facts(urls[name], args.model)}
            facts[name]["kv_cells"] = kv_cells(urls[name], args.model)
    finally:
        for proc in procs.values():
            stop(proc)
    rows = [level_row(rounds, list(chosen), int(c)) for c in args.concurrency.split(",")]
    text = markdown(args, rows, facts)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"settings": vars(args), "variants": facts, "levels": rows}, indent=2) + "\n")
    (RESULTS / f"{args.tag}.md").write_text(text)
    print(f"wrote {RESULTS / args.tag}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
