"""Cross-check one workload of the issue 19 suite with an outside load generator: guidellm.

    .venv/bin/python -m benchmarks.workloads.guidellm_check [--workload shared_prefix|uniform]
        [--rounds 2] [--quick] [--out benchmarks/results/guidellm-check-smollm2]

lmserve and llama-server are started exactly as benchmarks.workloads.run starts them for the
workload (its Server class: the same model file, threads, slots, context per slot, tokens per
decode call and each server's flags for the workload), both at once, each idle while the other
runs. Every round runs our own harness's workload (benchmarks.workloads.defs) and guidellm
0.8.1 (PyPI, in benchmarks/.peers/guidellm-venv, see benchmarks/peers/install_peers.sh) on
each server in turn; the order of the servers and of the two harnesses alternates round by
round. Ratios are lmserve / llama-server within a round, per harness; the report gives
medians over rounds.

guidellm's load mirrors ours (MIRRORS): its synthetic text at fixed concurrency (its
`concurrent` profile), with one shared prefix sent as the system message for shared_prefix.
Its synthetic prompts need a Hugging Face tokenizer: transformers builds it from the GGUF
file itself and saves it under benchmarks/.peers/guidellm-processor/; guidellm runs with
HF_HUB_OFFLINE=1, so nothing is fetched from a hub, and with one worker process
(GUIDELLM_ENV).

What differs between the two harnesses, by design of each:
- guidellm sends `ignore_eos` with `max_completion_tokens`, so every answer has exactly the
  asked length; our shared_prefix lets the model stop early (about 22 of 32 tokens).
- Our ITL percentiles are over every gap between streamed chunks; guidellm's are over each
  request's mean gap (weighted by its number of gaps), so its p99 sits far below ours.
- guidellm's texts are Faker sentences cut to a token count; ours are common English words.

Results: <out>.json (every round, the scenarios, each harness's figures) and <out>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.peers import servers
from benchmarks.peers.common import RESULTS, WORKDIR, log
from benchmarks.workloads import defs, run
from benchmarks.workloads.client import MODELS, chat
from lmserve.models.resolve import resolve

GUIDELLM_VERSION = "0.8.1"
GUIDELLM_VENV = servers.PEERS / "guidellm-venv"
GUIDELLM = GUIDELLM_VENV / "bin" / "guidellm"
PROCESSORS = servers.PEERS / "guidellm-processor"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# One worker process, which runs all its streams on one event loop. guidellm's default spawns a
# process per stream (up to 10); on this 2-core VM their start-up overlapped the measured
# window: 8 requests at c=8 on lmserve measured 0.32 req/s and TTFT p50 21.7 s with 8 workers,
# 2.07 req/s and 1.8 s with one (2026-12-07). With one worker its CPU during the window is
# small: 40 requests cost 0.8 CPU-s more than 8.
GUIDELLM_ENV = {**OFFLINE, "GUIDELLM__MAX_WORKER_PROCESSES": "1"}
SERVERS = ("lmserve", "llama-server")
HARNESSES = ("ours", "guidellm")


@dataclass(frozen=True)
class Mirror:
    """guidellm's synthetic data and load for one of our workloads (token counts before the
    chat template, which adds about 14 for SmolLM2)."""

    concurrency: int
    prompt_tokens: int
    prompt_min: int
    prompt_max: int
    output_tokens: int
    prefix_tokens: int = 0  # one prefix shared by every request of a run, as the system message


MIRRORS: dict[str, Mirror] = {
    # one ~1,530-token document ("Document N." and 1,400 words in sentences), questions of
    # "Question i:" and 10-30 words, 32 answer tokens, c=8: about 1,574 prompt tokens a request
    "shared_prefix": Mirror(8, 25, 14, 36, 32, prefix_tokens=1530),
    # "Request a-b-c:" and 128 words, 128 output tokens, end-of-generation ignored; the c=8
    # level of our uniform workload (2 x c requests)
    "uniform": Mirror(8, 136, 136, 136, 128),
}

# (key, label, scale for the table, digits); times are seconds in the figures
METRICS: tuple[tuple[str, str, float, int], ...] = (
    ("req_s", "requests/s", 1.0, 2),
    ("out_tok_s", "output tok/s", 1.0, 1),
    ("ttft_p50", "TTFT p50, s", 1.0, 2),
    ("ttft_p99", "TTFT p99, s", 1.0, 2),
    ("itl_p50", "ITL p50, ms", 1000.0, 1),
    ("itl_p99", "ITL p99, ms", 1000.0, 1),
)
# medians without a ratio: what a run sent and got
COUNTS: tuple[tuple[str, str, int], ...] = (
    ("prompt_tokens", "prompt tokens/request", 0), ("output_tokens", "output tokens/request", 1),
    ("requests", "requests ok", 0), ("failed", "requests failed", 0))


def plan(workload: str, scale: defs.Scale, quick: bool) -> tuple[defs.Scale, int, int]:
    """Our workload's sizes for the cross-check, the requests a run sends and its concurrency:
    shared_prefix as the suite runs it (scale.questions at c=8), uniform at its c=8 level only
    (2 x c requests); --quick sends 4 requests (shared_prefix at c=8, uniform at c=2)."""
    if workload == "shared_prefix":
        scale = dataclasses.replace(scale, questions=4) if quick else scale
        return scale, scale.questions, MIRRORS[workload].concurrency
    c = 2 if quick else MIRRORS[workload].concurrency
    return dataclasses.replace(scale, uniform_levels=(c,)), 2 * c, c


def scenario(workload: str, target: str, model: str, processor: str, requests: int,
             concurrency: int, seed: int, output: Path) -> dict[str, Any]:
    """A guidellm scenario file (`guidellm run -c FILE`) for one run against one server."""
    m = MIRRORS[workload]
    data: dict[str, Any] = {"kind": "synthetic_text", "prompt_tokens": m.prompt_tokens,
                            "output_tokens": m.output_tokens}
    if m.prompt_min != m.prompt_max:
        data.update(prompt_tokens_min=m.prompt_min, prompt_tokens_max=m.prompt_max,
                    prompt_tokens_stdev=max(1, (m.prompt_max - m.prompt_min) // 4))
    if m.prefix_tokens:
        data.update(prefix_tokens=m.prefix_tokens, prefix_count=1)
    return {
        "metadata": {"name": f"lmserve-{workload}-cross-check"},
        "spec": {
            "backend": {"kind": "openai_http", "target": target, "model": model,
                        "request_format": "/v1/chat/completions", "timeout": 600.0},
            "profile": {"kind": "concurrent", "streams": [concurrency]},
            "data": [data],
            "tokenizer": {"kind": "huggingface_auto", "model": processor},
            "constraints": [{"kind": "max_requests", "count": requests}],
            "seed": {"kind": "static", "value": seed},
            "outputs": [{"kind": "json", "path": str(output)}, {"kind": "console"}],
        },
    }


def _stat(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    stat: dict[str, Any] = metrics[key]["successful"]
    return stat


def guidellm_figures(report: dict[str, Any]) -> dict[str, float]:
    """req/s, output tok/s, TTFT and ITL p50/p99 (seconds) and the request counts of a
    guidellm JSON report with one benchmark (one concurrency level)."""
    benchmarks = report.get("benchmarks") or []
    if len(benchmarks) != 1:
        raise ValueError(f"expected one benchmark in the guidellm report, got {len(benchmarks)}")
    m = benchmarks[0]["metrics"]
    totals = m["request_totals"]
    ttft = _stat(m, "time_to_first_token_ms")["percentiles"]
    itl = _stat(m, "inter_token_latency_ms")["percentiles"]
    return {
        # rates: guidellm's mean over its measured window (completions / window)
        "req_s": float(_stat(m, "requests_per_second")["mean"]),
        "out_tok_s": float(_stat(m, "output_tokens_per_second")["mean"]),
        "ttft_p50": ttft["p50"] / 1000, "ttft_p99": ttft["p99"] / 1000,
        "itl_p50": itl["p50"] / 1000, "itl_p99": itl["p99"] / 1000,
        "prompt_tokens": float(_stat(m, "prompt_token_count")["mean"]),
        "output_tokens": float(_stat(m, "output_token_count")["mean"]),
        "requests": int(totals["successful"]),
        "failed": int(totals["errored"]) + int(totals["incomplete"]),
    }


def our_figures(fig: run.Figures) -> dict[str, float]:
    """The same figures from our harness (benchmarks.workloads.run.figures)."""
    out: dict[str, float] = {k: getattr(fig, k) for k, *_ in METRICS}
    n = max(fig.requests, 1)
    out.update(prompt_tokens=fig.prompt_tokens / n, output_tokens=fig.out_tok_s * fig.wall / n,
               requests=fig.requests, failed=fig.failed)
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per harness and server, and the median of the per-round
    lmserve / llama-server ratios per harness."""
    a, b = SERVERS
    out: dict[str, Any] = {"median": {}, "ratio": {}}
    for h in HARNESSES:
        runs = [r[h] for r in rounds if h in r]
        out["median"][h] = {n: {k: statistics.median([x[n]["figures"][k] for x in runs])
                                for k in (*(k for k, *_ in METRICS), *(k for k, *_ in COUNTS))}
                            for n in SERVERS} if runs else {}
        out["ratio"][h] = {}
        for k, *_ in METRICS:
            ratios = [x[a]["figures"][k] / x[b]["figures"][k] for x in runs
                      if x[b]["figures"][k]]
            out["ratio"][h][k] = statistics.median(ratios) if ratios else None
            out["ratio"][h][k + "_rounds"] = ratios
    return out


def _f(v: float | None, d: int) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def table(summary: dict[str, Any]) -> list[str]:
    """Rows: metric; columns: each server and the ratio, our harness then guidellm."""
    head = ["metric"]
    for h in HARNESSES:
        head += [f"{n} {h}" for n in SERVERS] + [f"ratio {h}"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k, label, scale, d in METRICS:
        cells = [label]
        for h in HARNESSES:
            med = summary["median"].get(h) or {}
            cells += [_f(med[n][k] * scale if n in med else None, d) for n in SERVERS]
            cells.append(_f(summary["ratio"][h].get(k), 2))
        lines.append("| " + " | ".join(cells) + " |")
    for k, label, d in COUNTS:
        cells = [label]
        for h in HARNESSES:
            med = summary["median"].get(h) or {}
            cells += [_f(med[n][k] if n in med else None, d) for n in SERVERS] + [""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    w, m = data["workload"], MIRRORS[data["workload"]]
    lines = [
        f"# {w}: our harness and guidellm {GUIDELLM_VERSION}, {data['model']} "
        f"({data['date']}, {data['rounds']} paired rounds)", "",
        f"Settings: {data['settings']}. {data['requests']} requests a run at c="
        f"{data['concurrency']}; guidellm's synthetic text: {m.prompt_tokens} prompt tokens "
        f"({m.prompt_min}-{m.prompt_max}), {m.output_tokens} output tokens (ignore_eos)"
        + (f", one {m.prefix_tokens}-token prefix as the system message" if m.prefix_tokens
           else "") + ". Ratios are lmserve / llama-server, medians of per-round ratios (below 1"
        " is better for TTFT and ITL). ITL: ours over every gap between chunks, guidellm's over"
        " each request's mean gap.", "",
        *table(data["summary"]), ""]
    cpu = data.get("client_cpu_s") or {}
    if cpu:
        lines.append("Client CPU seconds a run (median; guidellm's includes its start-up "
                     "before the measured window): " + ", ".join(
                         f"{h} {_f(statistics.median(v), 1)}" for h, v in cpu.items() if v)
                     + ".")
    return "\n".join(lines) + "\n"


# -- running ------------------------------------------------------------------------------------
def processor(model_path: str) -> Path:
    """A Hugging Face tokenizer for guidellm's synthetic prompts, built by transformers from
    the GGUF file itself (in guidellm's venv, offline) and kept beside it."""
    st = os.stat(model_path)
    key = hashlib.sha256(f"{model_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = PROCESSORS / f"{Path(model_path).stem}-{key}"
    if (dest / "tokenizer.json").is_file():
        return dest
    code = ("import os, sys; from transformers import AutoTokenizer; "
            "p = sys.argv[1]; t = AutoTokenizer.from_pretrained(os.path.dirname(p), "
            "gguf_file=os.path.basename(p)); t.save_pretrained(sys.argv[2])")
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run([str(GUIDELLM_VENV / "bin" / "python"), "-c", code, model_path, str(tmp)],
                   check=True, env={**os.environ, **OFFLINE}, capture_output=True)
    tmp.rename(dest)
    return dest


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_guidellm(args: argparse.Namespace, server: run.Server, proc_dir: Path, seed: int,
                 work: Path, tag: str) -> tuple[dict[str, float], dict[str, Any], float]:
    """One guidellm run against `server`: its figures, the scenario and its CPU seconds."""
    out = work / f"{tag}.json"
    scen = scenario(args.workload, server.base, MODELS[server.base], str(proc_dir),
                    args.requests, args.concurrency, seed, out)
    path = work / f"{tag}-scenario.json"
    path.write_text(json.dumps(scen, indent=1))
    cpu = _children_cpu()
    with open(work / f"{tag}.log", "wb") as logf:
        rc = subprocess.run([str(GUIDELLM), "run", "-c", str(path), "--disable-progress"],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=work,
                            env={**os.environ, **GUIDELLM_ENV}).returncode
    if rc != 0 or not out.is_file():
        tail = (work / f"{tag}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"guidellm exited with status {rc} ({work / f'{tag}.log'}):\n{tail}")
    return guidellm_figures(json.loads(out.read_text())), scen, _children_cpu() - cpu


async def warm_up(server: run.Server) -> None:
    """One short request, so that neither harness meets a server's very first request (the
    first round would give that to whichever harness runs first)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        r = await chat(client, server.base, {"messages": [{"role": "user", "content": "Hello"}],
                                             "max_tokens": 8, "temperature": 0}, kind="warm-up")
    if not r.ok:
        raise RuntimeError(f"{server.name} warm-up failed: {r.error}")


async def run_ours(workload: str, server: run.Server, seed: int,
                   scale: defs.Scale) -> tuple[dict[str, float], float]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    cpu = time.process_time()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        outcome = await defs.WORKLOADS[workload](client, server.base, seed, scale)
    return our_figures(run.figures(outcome)), time.process_time() - cpu


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="shared_prefix", choices=sorted(MIRRORS))
    p.add_argument("--rounds", type=int, default=None, help="default 2 (1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="4 requests a run, to check that the cross-check works")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                   help="texts are drawn from it (default: the clock, so a rerun is cold)")
    p.add_argument("--out", type=Path, default=None,
                   help="result path without extension (default: "
                        "benchmarks/results/guidellm-check-MODEL; with --quick "
                        "benchmarks/results/tmp/guidellm-check-MODEL-quick)")
    args = p.parse_args(argv)
    # the servers' settings and the workload sizes of the suite itself
    suite = run.parse_args(["--workloads", args.workload, "--model", args.model,
                            *(["--quick"] if args.quick else [])])
    args.settings = suite.settings
    args.scale, args.requests, args.concurrency = plan(args.workload, suite.scale, args.quick)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.out is None:  # a quick check goes to the git-ignored tmp/
        args.out = (RESULTS / "tmp" / f"guidellm-check-{args.model}-quick" if args.quick
                    else RESULTS / f"guidellm-check-{args.model}")
    args.out = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for need, what in ((servers.PEER_PY, "llama-server"), (GUIDELLM, "guidellm")):
        if not need.exists():
            log(f"{what} not installed: run benchmarks/peers/install_peers.sh ({need})")
            return 2
    path = resolve(args.model).path
    proc_dir = processor(path)
    work = WORKDIR.parent / "guidellm"
    work.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="lmserve-guidellm-"))
    pair = {n: run.Server(n, path, args.workload, args.settings, state) for n in SERVERS}
    data: dict[str, Any] = {
        "workload": args.workload, "model": args.model, "path": path,
        "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "seed": args.seed,
        "settings": asdict(args.settings), "scale": asdict(args.scale),
        "requests": args.requests, "concurrency": args.concurrency,
        "mirror": asdict(MIRRORS[args.workload]),
        "guidellm": GUIDELLM_VERSION, "processor": str(proc_dir), "env": GUIDELLM_ENV,
        "flags": {}, "scenarios": [], "per_round": [],
        "client_cpu_s": {h: [] for h in HARNESSES}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for s in pair.values():
            s.start()
            asyncio.run(warm_up(s))
        data["flags"] = {n: list(s.spec.command[1:]) for n, s in pair.items()}
        for r in range(args.rounds):
            seed = args.seed * 1000 + r * 37 + run.ALL.index(args.workload)
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            harnesses = list(HARNESSES) if r % 2 == 0 else list(reversed(HARNESSES))
            per: dict[str, Any] = {"seed": seed, "order": order, "harnesses": harnesses}
            for h in harnesses:
                per[h] = {}
                for n in order:
                    t = time.monotonic()
                    if h == "ours":
                        fig, cpu = asyncio.run(run_ours(args.workload, pair[n], seed,
                                                        args.scale))
                    else:
                        fig, scen, cpu = run_guidellm(args, pair[n], proc_dir, seed, work,
                                                      f"round{r}-{n}")
                        data["scenarios"].append(scen)
                    per[h][n] = {"figures": fig, "seconds": time.monotonic() - t}
                    data["client_cpu_s"][h].append(cpu)
                    log(f"{args.workload} round {r} {h} {n}: {fig['requests']} ok "
                        f"{fig['failed']} failed, {fig['req_s']:.2f} req/s, "
                        f"{fig['out_tok_s']:.1f} tok/s, TTFT p50 {fig['ttft_p50']:.2f} s, "
                        f"ITL p50 {fig['itl_p50'] * 1000:.0f} ms "
                        f"({time.monotonic() - t:.0f} s, client CPU {cpu:.1f} s)")
            data["per_round"].append(per)
            data["summary"] = summarize(data["per_round"])
            args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
            args.out.with_suffix(".md").write_text(markdown(data))
    finally:
        for s in pair.values():
            s.stop()
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
