"""lmserve against the servers users would otherwise pick, in one run, on this machine.

    benchmarks/peers/install_peers.sh            # once: peers into benchmarks/.peers/
    .venv/bin/python -m benchmarks.peers.run_peers [--models smollm2,gemma3-270m]

For each model and each server (lmserve as is, with --lookup 8, with --kv-split, with both;
llama.cpp's llama-server with a KV stream per slot, as -np gives, and with one shared pool,
-kvu; llama-cpp-python's batched example server; python -m llama_cpp.server; settings made
equal in servers.py, which says how): start it on a
free loopback port, wait until it is ready, check with one non-streamed request that a request
really generates --output-len tokens (ignore_eos or its stand-in), sweep concurrency with the
closed-loop harness, run the shared-prefix scenario (TTFT of later requests against the first),
stop it. lmserve's /metrics is scraped around each level for per-step engine timings. Writes
<out-dir>/<tag>.json (updated after every server) and <tag>.md: absolute numbers, the ratios
of each lmserve configuration to each peer, lmserve's per-step timings. Server logs go to
benchmarks/results/tmp/peers/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness.compare import markdown, ratios
from benchmarks.harness.engine_metrics import MetricsProbe
from benchmarks.harness.procs import free_port, start_process, stop, wait_ready
from benchmarks.peers import servers
from benchmarks.peers.common import WORKDIR, add_arguments, log, parse
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.prompts import make_prompts
from lmserve.bench.report import format_table, to_json
from lmserve.bench.scenarios import shared_prefix, sweep
from lmserve.bench.stats import LevelResult
from lmserve.models.resolve import resolve


def _progress(level: LevelResult) -> None:
    log(f"    c={level.concurrency}: {level.completed}/{level.num_requests} ok, "
        f"{level.output_throughput:.1f} tok/s, {level.mean_output_tokens or 0:.0f} tok/req")


async def length_check(backend: OpenAIHTTPBackend, args: argparse.Namespace) -> dict[str, Any]:
    """One non-streamed request: does the server generate exactly --output-len tokens?"""
    req = make_prompts(1, args.input_len, max_tokens=args.output_len, first_index=10**6)[0]
    body = await backend.complete(req)
    choices = body.get("choices") or [{}]
    tokens = (body.get("usage") or {}).get("completion_tokens")
    return {"expected": args.output_len, "completion_tokens": tokens,
            "finish_reason": choices[0].get("finish_reason"), "ok": tokens == args.output_len}


async def measure(spec: servers.ServerSpec, url: str, args: argparse.Namespace) -> dict[str, Any]:
    backend = OpenAIHTTPBackend(url, None, max_connections=max(args.concurrency),
                                timeout=args.timeout, extra_body=spec.extra_body)
    probe = MetricsProbe(url) if spec.engine_metrics else None
    try:
        backend.model = (await backend.list_models() or [None])[0]
        check = await length_check(backend, args)
        log(f"  length check: {check}")
        result = await sweep(backend, args.concurrency, args.input_len, args.output_len,
                             args.requests_per_level, args.warmup, on_level=_progress, probe=probe)
        if args.prefix_len > 0:
            result.shared_prefix = await shared_prefix(backend, prefix_len=args.prefix_len,
                                                       tail_len=32, output_len=16, n=4)
        log(format_table(result))
        return {"length_check": check, "sweep": to_json(result, include_requests=True),
                "shared_prefix": result.shared_prefix}
    finally:
        await backend.aclose()
        if probe is not None:
            await probe.aclose()


def run_server(name: str, model: str, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    spec = servers.build(name, model, port, args.settings, WORKDIR)
    spec.write_config()
    log_path = WORKDIR / f"{tag}-{name}.log"
    info: dict[str, Any] = {"command": spec.command, "extra_body": spec.extra_body,
                            "log": str(log_path)}
    log(f"== {name} on {Path(model).name}: {' '.join(spec.command)}")
    proc = start_process(spec.command, log_path=log_path)
    try:
        info["ready_s"] = wait_ready(proc, f"http://127.0.0.1:{port}{spec.ready_path}",
                                     args.ready_timeout)
        return {**info, **asyncio.run(measure(spec, f"http://127.0.0.1:{port}", args))}
    except Exception as exc:  # noqa: BLE001 - ServerStartError or any other: record, go on
        log(f"  {name} failed: {type(exc).__name__}: {exc} (log: {log_path})")
        return {**info, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        stop(proc)


def header(args: argparse.Namespace) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu},
            "settings": vars(args.settings),
            "workload": {"concurrency": args.concurrency, "input_len": args.input_len,
                         "output_len": args.output_len, "warmup": args.warmup,
                         "requests_per_level": args.requests_per_level,
                         "prefix_len": args.prefix_len},
            "models": {}}


def write(data: dict[str, Any], args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.tag}.json").write_text(json.dumps(data, indent=1))
    sections = [markdown(name, m["servers"], ttft_concurrency=args.ttft_concurrency)
                for name, m in data["models"].items()]
    settings = data["settings"]
    intro = (f"# lmserve against peers ({data['started']}, {data['machine']['cpus']} CPUs, "
             f"{data['machine']['cpu']})\n\nthreads {settings['threads']}, parallel "
             f"{settings['parallel']}, {settings['ctx_per_seq']} context tokens per sequence, "
             f"batch {settings['batch']}; prompts ~{args.input_len} tokens, "
             f"{args.output_len} output tokens, ignore_eos.\n\n")
    (args.out_dir / f"{args.tag}.md").write_text(intro + "\n".join(sections))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if any(not n.startswith("lmserve") for n in args.servers) and not servers.PEER_PY.exists():
        log(f"peers not installed: run benchmarks/peers/install_peers.sh ({servers.PEER_PY})")
        return 2
    WORKDIR.mkdir(parents=True, exist_ok=True)
    data = header(args)
    for ref in args.models:
        model = resolve(ref)
        entry = data["models"].setdefault(ref, {"path": model.path, "servers": {}})
        for name in args.servers:
            entry["servers"][name] = run_server(name, model.path, f"{args.tag}-{ref}", args)
            entry["ratios"] = ratios(entry["servers"], ttft_concurrency=args.ttft_concurrency)
            write(data, args)
    log((args.out_dir / f"{args.tag}.md").read_text())
    failed = [f"{m}/{s}" for m, e in data["models"].items() for s, r in e["servers"].items()
              if "error" in r or not r["length_check"]["ok"] or any(
                  lv["failed"] for lv in r["sweep"]["levels"])]
    if failed:
        log(f"problems (see the JSON): {', '.join(failed)}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, servers_default=",".join(servers.SERVERS), tag="peers")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefix-len", type=int, default=1000,
                   help="shared-prefix scenario's prefix, ~tokens (0: skip it)")
    p.add_argument("--ttft-concurrency", type=int, default=8)
    return parse(p, argv)


if __name__ == "__main__":
    sys.exit(main())
