"""Paired peer comparison: the servers take turns level by level, round after round.

    .venv/bin/python -m benchmarks.peers.paired [--models smollm2,gemma3-270m]
        [--servers lmserve,llama-server,llama-cpp-python-batched]
        [--rounds 2] [--concurrency 1,4,8,16]

run_peers.py measures one server after another, a few minutes each, and this VM's speed
drifts by up to about 30% over minutes (the same raw decode loop measured 35 and 47 ms a
step half an hour apart). Here all servers of a model are started at once (an idle one uses
no CPU; each is checked), and every concurrency level is run by each server in turn, the
order rotated by one every round, so a slow spell hits them alike. Every request has its own
numbered prompt (no prompt-cache reuse across servers, rounds or levels; the turns are
benchmarks.harness.paired's). Reports, per
server and level, the median over rounds of output tok/s and TTFT p50, and for each lmserve
configuration the median over rounds of its per-round ratio to each peer, measured minutes
apart at most. Same settings as run_peers.py (servers.py). Writes <out-dir>/<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness.paired import take_turns
from benchmarks.harness.procs import free_port, start_process, stop, wait_ready
from benchmarks.peers import servers
from benchmarks.peers.common import WORKDIR, add_arguments, log, parse
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.prompts import make_prompts
from lmserve.bench.runner import run_level
from lmserve.bench.stats import LevelResult
from lmserve.models.resolve import resolve


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def idle_load(procs: dict[str, Any], seconds: float = 3.0) -> dict[str, float]:
    """Fraction of a core each started server uses while nobody asks it anything."""
    before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
    time.sleep(seconds)
    return {name: round((cpu_seconds(p.pid) - before[name]) / seconds, 3)
            for name, p in procs.items()}


def level_summary(level: LevelResult) -> dict[str, Any]:
    return {"output_tok_s": level.output_throughput, "ttft_p50_ms": level.ttft.p50,
            "tpot_p50_ms": level.tpot.p50, "failed": level.failed,
            "mean_output_tokens": level.mean_output_tokens}


async def measure_model(model_path: str, args: argparse.Namespace) -> dict[str, Any]:
    procs, backends, specs = {}, {}, {}
    try:
        for name in args.servers:
            port = free_port()
            spec = servers.build(name, model_path, port, args.settings, WORKDIR)
            spec.write_config()
            procs[name] = start_process(spec.command, log_path=WORKDIR / f"paired-{name}.log")
            wait_ready(procs[name], f"http://127.0.0.1:{port}{spec.ready_path}",
                       args.ready_timeout)
            backend = OpenAIHTTPBackend(f"http://127.0.0.1:{port}", None,
                                        max_connections=max(args.concurrency),
                                        timeout=args.timeout, extra_body=spec.extra_body)
            backend.model = (await backend.list_models() or [None])[0]
            backends[name], specs[name] = backend, spec.command
        idle = idle_load(procs)
        log(f"  idle CPU (cores): {idle}")
        warm = make_prompts(len(backends), args.input_len, max_tokens=args.output_len,
                            first_index=10**6)
        for prompt, backend in zip(warm, backends.values(), strict=True):
            await run_level(backend, [prompt], 1, 1)
        turns = await take_turns(
            backends, args.concurrency, rounds=args.rounds, input_len=args.input_len,
            output_len=args.output_len, requests_per_level=args.requests_per_level,
            on_level=lambda r, name, level: log(
                f"  round {r + 1} c={level.concurrency} {name}: "
                f"{level.output_throughput:.1f} tok/s, {level.failed} failed"))
        rounds = [{name: {c: level_summary(level) for c, level in by_c.items()}
                   for name, by_c in turn.items()} for turn in turns]
        return {"commands": specs, "idle_cores": idle, "rounds": rounds,
                "summary": summarize(rounds, list(backends))}
    finally:
        for backend in backends.values():
            await backend.aclose()
        for proc in procs.values():
            stop(proc)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[dict], names: list[str]) -> dict[str, Any]:
    levels = sorted(rounds[0][names[0]])
    absolute = {name: {c: {key: _median([r[name][c][key] for r in rounds])
                           for key in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")}
                       for c in levels} for name in names}
    ratios: dict[str, dict[str, Any]] = {}
    for base in (n for n in names if n.startswith("lmserve")):
        for peer in (n for n in names if not n.startswith("lmserve")):
            ratios.setdefault(base, {})[peer] = {
                c: {"tok_s": _median([r[base][c]["output_tok_s"] / r[peer][c]["output_tok_s"]
                                      for r in rounds if r[peer][c]["output_tok_s"]]),
                    "ttft_p50": _median([r[base][c]["ttft_p50_ms"] / r[peer][c]["ttft_p50_ms"]
                                         for r in rounds
                                         if r[base][c]["ttft_p50_ms"]
                                         and r[peer][c]["ttft_p50_ms"]])}
                for c in levels}
    return {"levels": levels, "absolute": absolute, "ratios": ratios}


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# Paired peer comparison ({data['started']}, {data['rounds']} rounds)", ""]
    for model, entry in data["models"].items():
        summary = entry["summary"]
        levels = summary["levels"]
        lines += [f"## {model}", "", "Output tok/s per concurrency, median over rounds; the "
                  "CPU each server used while idle, in cores.", "",
                  "| server | " + " | ".join(f"c={c}" for c in levels) + " | idle cores |",
                  "|---|" + "---:|" * (len(levels) + 1)]
        for name, by_c in summary["absolute"].items():
            cells = [f"{by_c[c]['output_tok_s']:.1f}" for c in levels]
            lines.append(f"| {name} | " + " | ".join(cells) +
                         f" | {entry['idle_cores'][name]} |")
        for base, peers in summary["ratios"].items():
            lines += ["", f"{base} / peer, median of per-round ratios (tok/s; TTFT p50 in "
                      "brackets, below 1 is sooner):", "",
                      "| peer | " + " | ".join(f"c={c}" for c in levels) + " |",
                      "|---|" + "---:|" * len(levels)]
            for peer, by_c in peers.items():
                cells = [f"{by_c[c]['tok_s']:.2f} ({by_c[c]['ttft_p50']:.2f})"
                         if by_c[c]["tok_s"] is not None and by_c[c]["ttft_p50"] is not None
                         else "-" for c in levels]
                lines.append(f"| {peer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, servers_default="lmserve,llama-server,llama-cpp-python-batched",
                  tag="peers-paired")
    p.add_argument("--rounds", type=int, default=2)
    return parse(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "rounds": args.rounds, "settings": vars(args.settings),
                            "concurrency": args.concurrency, "models": {}}
    for ref in args.models:
        log(f"== {ref}")
        data["models"][ref] = asyncio.run(measure_model(resolve(ref).path, args))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.tag}.json").write_text(json.dumps(data, indent=1))
        (args.out_dir / f"{args.tag}.md").write_text(markdown(data))
    log((args.out_dir / f"{args.tag}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
