"""Scaling across replicas (issue 18): throughput, TTFT and ITL of 1, 2 and 3 lmserve replicas
behind sglang-router on the same workload, paired in one run, and the router's added latency
against calling a replica directly.

    .venv/bin/python -m benchmarks.cluster_scaling [--model smollm2] [--replicas 1,2,3]
        [--rounds 10] [--requests 12] [--concurrency 4] [--max-tokens 64] [--input-len 64]
        [--latency-pairs 20] [--policy round_robin] [--threads 1] [--quick]
        [--out benchmarks/results/cluster-scaling-smollm2]

One local cluster from `lmserve cluster`'s code (lmserve.cluster.LocalCluster: redis-server,
max(--replicas) replicas with `--threads` each and `--parallel` = `--concurrency`) is started
once, plus one more router per smaller replica count: `router-N` routes to replicas 0..N-1.
So every configuration runs on the same replica processes, only the one under test carries
requests, and no cluster start-up sits between the configurations of a round. `direct` is
replica 0 without a router.

Workload: streamed OpenAI chat requests (`/v1/chat/completions`, greedy, `ignore_eos`, exactly
`--max-tokens` output tokens each), every prompt its own ("Request i: " and `--input-len`
random words), so no request reuses another's KV beyond the chat template's fixed opening.
Closed loop at `--concurrency` requests in flight per replica (router-N: N x c), `--requests`
requests per replica (router-N: N x that), so each configuration is loaded to its capacity
and no replica queues beyond its `--parallel`. A warm-up level per configuration, not counted,
opens every connection and gives each replica its first requests.

Every round runs (1) the router's added latency: `--latency-pairs` pairs at c=1 of one request
to replica 0 directly and one through router-1, back to back, the order alternating pair by
pair, each with its own short prompt (`--latency-input-len` words, `--latency-max-tokens`
tokens); then (2) every configuration once, the order rotated by one every round, so the VM's
drift (10-30% over minutes) hits them alike. Reported: per configuration, the median over rounds
of output tokens/s and requests/s and of the within-round ratio to router-1; TTFT and ITL
p50/p99 over all rounds' requests; the replicas' share of generated tokens (their
`lmserve_generated_tokens_total`); the router's added TTFT at c=1 (median of the per-pair
differences, with a distribution-free 95% interval) and router-1 against direct at the
scaling load. Results go to OUT.json and OUT.md.

round_robin is the default policy: with unique prompts cache_aware has no prefix to follow and
falls back to its own choice of worker, while round_robin splits identical requests exactly
evenly, so the figure measures capacity rather than a policy; `--policy cache_aware` (with
lmserve cluster's balance thresholds) is there to check that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.cluster import exit_on_sigterm, replica_counters, replica_urls
from benchmarks.harness.paired import rotated
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.prompts import make_prompts
from lmserve.bench.runner import run_level, run_request
from lmserve.bench.stats import LevelResult, RequestRecord, percentile
from lmserve.cluster import DEFAULT_ROUTER_ARGS, LocalCluster, RouterProcess

RESULTS = Path(__file__).parent / "results"
DIRECT = "direct"
BASELINE = "router-1"
POLICIES = {"round_robin": ("--policy", "round_robin"), "cache_aware": DEFAULT_ROUTER_ARGS}
FULL = {"rounds": 10, "requests": 12, "max_tokens": 64, "input_len": 64, "latency_pairs": 20,
        "latency_input_len": 16, "latency_max_tokens": 4}
QUICK = {"rounds": 1, "requests": 4, "max_tokens": 16, "input_len": 32, "latency_pairs": 4,
         "latency_input_len": 16, "latency_max_tokens": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--replicas", default="1,2,3",
                   help="replica counts behind the router, comma-separated; must hold 1 "
                        "(the baseline and the router's pair) (default 1,2,3)")
    p.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']})")
    p.add_argument("--requests", type=int,
                   help=f"requests per replica per configuration and round "
                        f"(default {FULL['requests']})")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight per replica, and each replica's --parallel "
                        "(default 4)")
    p.add_argument("--max-tokens", type=int,
                   help=f"output tokens per request (default {FULL['max_tokens']})")
    p.add_argument("--input-len", type=int,
                   help=f"prompt words per request (default {FULL['input_len']})")
    p.add_argument("--latency-pairs", type=int,
                   help=f"direct/router request pairs at c=1 per round "
                        f"(default {FULL['latency_pairs']})")
    p.add_argument("--latency-input-len", type=int,
                   help=f"prompt words of those requests (default {FULL['latency_input_len']})")
    p.add_argument("--latency-max-tokens", type=int,
                   help=f"output tokens of those requests "
                        f"(default {FULL['latency_max_tokens']})")
    p.add_argument("--policy", choices=sorted(POLICIES), default="round_robin",
                   help="the routers' policy (default round_robin)")
    p.add_argument("--threads", type=int, default=1, help="each replica's --threads (default 1)")
    p.add_argument("--ctx", type=int, default=1024, help="each replica's --ctx (default 1024)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run to check the script: " + ", ".join(
                       f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--out", type=Path,
                   help="output path without suffix; OUT.json and OUT.md are written "
                        "(default benchmarks/results/cluster-scaling-MODEL, -quick with --quick)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        counts = sorted({int(n) for n in args.replicas.split(",")})
    except ValueError:
        p.error(f"--replicas takes comma-separated integers, not {args.replicas!r}")
    if 1 not in counts or counts[0] < 1:
        p.error("--replicas must hold 1 (the baseline) and only positive counts")
    args.replica_counts = counts
    for key in ("rounds", "requests", "concurrency", "max_tokens", "input_len",
                "latency_max_tokens", "threads", "ctx"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.latency_pairs < 0 or args.latency_input_len < 0:
        p.error("--latency-pairs and --latency-input-len must be at least 0")
    if args.out is None:
        args.out = RESULTS / f"cluster-scaling-{args.model}{'-quick' if args.quick else ''}"
    return args


def configurations(counts: Sequence[int]) -> list[str]:
    """`direct` then `router-N` for each replica count, in that order."""
    return [DIRECT, *(f"router-{n}" for n in counts)]


def replicas_of(name: str) -> int:
    return 1 if name == DIRECT else int(name.rsplit("-", 1)[1])


def direct_first(pair: int, round_index: int) -> bool:
    """Whether pair `pair` of round `round_index` sends its direct request first: the order
    alternates pair by pair, and round by round."""
    return (pair + round_index) % 2 == 0


# ---- statistics (pure) -----------------------------------------------------------------------

@dataclass
class Level:
    """One configuration in one round: its figures and its requests' TTFTs and ITLs (ms)."""

    concurrency: int
    completed: int
    failed: int
    duration_s: float
    output_tok_s: float
    req_s: float
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    replica_tokens: list[float] = field(default_factory=list)  # growth of each replica's count
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, level: LevelResult, replica_tokens: Sequence[float] = ()) -> Level:
        ok = [r for r in level.records if r.ok]
        return cls(
            concurrency=level.concurrency, completed=level.completed, failed=level.failed,
            duration_s=level.duration_s, output_tok_s=level.output_throughput,
            req_s=level.request_throughput,
            ttft_ms=[t * 1000.0 for r in ok if (t := r.ttft) is not None],
            itl_ms=[g * 1000.0 for r in ok for g in r.itl],
            output_tokens=[r.output_tokens for r in ok],
            replica_tokens=list(replica_tokens), errors=list(level.errors))

    def figures(self) -> dict[str, Any]:
        """What the JSON keeps of one round (no per-request lists)."""
        return {
            "concurrency": self.concurrency, "completed": self.completed, "failed": self.failed,
            "duration_s": round(self.duration_s, 3), "output_tok_s": round(self.output_tok_s, 2),
            "req_s": round(self.req_s, 3), "ttft_p50_ms": _r(_pct(self.ttft_ms, 50)),
            "ttft_p99_ms": _r(_pct(self.ttft_ms, 99)), "itl_p50_ms": _r(_pct(self.itl_ms, 50)),
            "itl_p99_ms": _r(_pct(self.itl_ms, 99)),
            "replica_tokens": self.replica_tokens, "errors": self.errors}


Round = dict[str, Level]


def _pct(values: Sequence[float], p: float) -> float | None:
    return percentile(values, p) if values else None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def median_interval(values: Sequence[float], confidence: float = 0.95
                    ) -> tuple[float, float] | None:
    """A distribution-free interval for the median: the order statistics x(k) and x(n+1-k)
    (1-based) with the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at least
    `confidence`. None when too few values give that coverage (n < 6 at 95%)."""
    n = len(values)
    ordered = sorted(values)
    alpha = 1.0 - confidence
    below = 0.0  # P(B <= k - 1), k starting at 1
    best = 0
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1) / 2.0 ** n
        if 2.0 * below > alpha:
            break
        best = k
    if best == 0:
        return None
    return ordered[best - 1], ordered[n - best]


def scaling_summary(rounds: Sequence[Round], baseline: str = BASELINE) -> dict[str, Any]:
    """Per configuration: medians over rounds of the throughputs and of their within-round
    ratios to `baseline`, TTFT and ITL percentiles over all rounds' requests, the replicas'
    shares of the generated tokens, and the requests completed and failed."""
    names = list(dict.fromkeys(name for r in rounds for name in r))
    out: dict[str, Any] = {}
    for name in names:
        levels = [r[name] for r in rounds if name in r]
        paired = [(r[name], r[baseline]) for r in rounds if name in r and baseline in r]
        tok_ratio = [lv.output_tok_s / base.output_tok_s for lv, base in paired
                     if base.output_tok_s > 0]
        ttft_ratio = [a / b for lv, base in paired
                      if (a := _pct(lv.ttft_ms, 50)) is not None
                      and (b := _pct(base.ttft_ms, 50))]
        ttft = [t for lv in levels for t in lv.ttft_ms]
        itl = [g for lv in levels for g in lv.itl_ms]
        tokens = [sum(col) for col in zip(*(lv.replica_tokens for lv in levels), strict=True)] \
            if levels and all(lv.replica_tokens for lv in levels) else []
        total = sum(tokens)
        outputs = [n for lv in levels for n in lv.output_tokens]
        out[name] = {
            "replicas": replicas_of(name),
            "concurrency": levels[0].concurrency,
            "rounds": len(levels),
            "output_tok_s": _r(_median([lv.output_tok_s for lv in levels])),
            "req_s": _r(_median([lv.req_s for lv in levels]), 3),
            "output_tok_s_per_round": [round(lv.output_tok_s, 2) for lv in levels],
            "vs_baseline": {"output_tok_s": _r(_median(tok_ratio), 3),
                            "output_tok_s_per_round": [round(x, 3) for x in tok_ratio],
                            "ttft_p50": _r(_median(ttft_ratio), 3)},
            "ttft_ms": {"p50": _r(_pct(ttft, 50)), "p99": _r(_pct(ttft, 99)),
                        "round_p50_median": _r(_median(
                            [p for lv in levels if (p := _pct(lv.ttft_ms, 50)) is not None]))},
            "itl_ms": {"p50": _r(_pct(itl, 50)), "p99": _r(_pct(itl, 99))},
            "replica_token_share": [round(t / total, 4) for t in tokens] if total else [],
            "completed": sum(lv.completed for lv in levels),
            "failed": sum(lv.failed for lv in levels),
            "output_tokens_min_max": [min(outputs), max(outputs)] if outputs else [],
        }
    return out


def router_latency(pairs: Sequence[tuple[float, float]], confidence: float = 0.95
                   ) -> dict[str, Any]:
    """The router's added TTFT from (direct ms, through the router ms) pairs: the median of
    the per-pair differences with its interval, their mean, and each side's p50."""
    diffs = [routed - direct for direct, routed in pairs]
    interval = median_interval(diffs, confidence)
    return {
        "pairs": len(pairs),
        "median_diff_ms": _r(_median(diffs), 3),
        "median_diff_interval_ms": None if interval is None
        else [round(interval[0], 3), round(interval[1], 3)],
        "confidence": confidence,
        "mean_diff_ms": _r(statistics.fmean(diffs), 3) if diffs else None,
        "direct_p50_ms": _r(_pct([d for d, _ in pairs], 50), 3),
        "router_p50_ms": _r(_pct([r for _, r in pairs], 50), 3),
    }


def router_under_load(rounds: Sequence[Round]) -> dict[str, Any]:
    """router-1 against direct at the scaling load: per-round throughput ratio and TTFT p50
    difference, their medians, and the ITL p50 of each over all rounds."""
    paired = [(r[BASELINE], r[DIRECT]) for r in rounds if BASELINE in r and DIRECT in r]
    ratio = [a.output_tok_s / b.output_tok_s for a, b in paired if b.output_tok_s > 0]
    ttft = [x - y for a, b in paired if (x := _pct(a.ttft_ms, 50)) is not None
            and (y := _pct(b.ttft_ms, 50)) is not None]
    return {
        "output_tok_s_ratio": _r(_median(ratio), 3),
        "output_tok_s_ratio_per_round": [round(x, 3) for x in ratio],
        "ttft_p50_diff_ms": _r(_median(ttft)),
        "ttft_p50_diff_ms_per_round": [round(x, 2) for x in ttft],
        "itl_p50_ms": {"direct": _r(_pct([g for a, b in paired for g in b.itl_ms], 50), 3),
                       "router": _r(_pct([g for a, b in paired for g in a.itl_ms], 50), 3)},
    }


# ---- the run ---------------------------------------------------------------------------------

@dataclass
class Targets:
    """Where each configuration's requests go, and every replica (for their counters)."""

    urls: dict[str, str]
    replicas: list[str]


class Prompts:
    """Numbered prompts that never repeat within a run."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int, words: int, max_tokens: int) -> list[Any]:
        out = make_prompts(n, words, max_tokens=max_tokens, first_index=self.next,
                           seed=self.next)
        self.next += n
        return out


async def measure_pairs(backends: Mapping[str, OpenAIHTTPBackend], prompts: Prompts,
                        args: argparse.Namespace, round_index: int
                        ) -> list[tuple[RequestRecord, RequestRecord]]:
    """`args.latency_pairs` (direct, router-1) request pairs at c=1, back to back."""
    reqs = prompts.take(2 * args.latency_pairs, args.latency_input_len, args.latency_max_tokens)
    out = []
    for k in range(args.latency_pairs):
        first, second = reqs[2 * k], reqs[2 * k + 1]
        if direct_first(k, round_index):
            direct = await run_request(backends[DIRECT], first)
            routed = await run_request(backends[BASELINE], second)
        else:
            routed = await run_request(backends[BASELINE], first)
            direct = await run_request(backends[DIRECT], second)
        out.append((direct, routed))
    return out


async def measure_level(name: str, backend: OpenAIHTTPBackend, prompts: Prompts,
                        targets: Targets, args: argparse.Namespace) -> Level:
    n = replicas_of(name)
    count = args.requests * n
    reqs = prompts.take(count, args.input_len, args.max_tokens)
    before = [replica_counters(u)["lmserve_generated_tokens_total"] for u in targets.replicas]
    level = await run_level(backend, reqs, args.concurrency * n, count)
    after = [replica_counters(u)["lmserve_generated_tokens_total"] for u in targets.replicas]
    return Level.of(level, [a - b for a, b in zip(after, before, strict=True)])


async def run_rounds(targets: Targets, args: argparse.Namespace, write: Any) -> None:
    names = configurations(args.replica_counts)
    most = args.concurrency * max(args.replica_counts)
    backends = {name: OpenAIHTTPBackend(targets.urls[name], args.model, endpoint="chat",
                                        max_connections=most) for name in names}
    prompts = Prompts()
    rounds: list[Round] = []
    pairs: list[tuple[float, float]] = []
    pair_failures: list[str] = []
    loads: list[list[float]] = []
    try:
        for name in names:  # warm-up, not counted: every connection, each replica's first
            c = args.concurrency * replicas_of(name)  # requests
            await run_level(backends[name], prompts.take(c, args.input_len, 4), c, c)
        for r in range(args.rounds):
            loads.append([round(x, 2) for x in os.getloadavg()])
            for direct, routed in await measure_pairs(backends, prompts, args, r):
                if direct.ttft is not None and routed.ttft is not None:
                    pairs.append((direct.ttft * 1000.0, routed.ttft * 1000.0))
                else:
                    pair_failures += [x.error or "no token" for x in (direct, routed) if not x.ok]
            current: Round = {}
            for name in rotated(names, r):
                level = await measure_level(name, backends[name], prompts, targets, args)
                current[name] = level
                print(f"round {r + 1}/{args.rounds} {name:<9} c={level.concurrency:<3} "
                      f"{level.output_tok_s:7.1f} tok/s  TTFT p50 "
                      f"{_pct(level.ttft_ms, 50) or 0:7.1f} ms  failed {level.failed}",
                      file=sys.stderr, flush=True)
            rounds.append(current)
            lat = router_latency(pairs)
            print(f"round {r + 1}/{args.rounds} router's added TTFT at c=1: median "
                  f"{lat['median_diff_ms']} ms over {lat['pairs']} pairs", file=sys.stderr,
                  flush=True)
            loads[-1] += [round(x, 2) for x in os.getloadavg()]
            write(rounds, pairs, pair_failures, loads)  # every round: a cut run keeps it
    finally:
        for backend in backends.values():
            await backend.aclose()


def start(args: argparse.Namespace, workdir: Path) -> tuple[LocalCluster, list[RouterProcess],
                                                              Targets]:
    most = max(args.replica_counts)
    router_args = POLICIES[args.policy]
    serve_args = ("--parallel", str(args.concurrency), "--ctx", str(args.ctx),
                  "--log-level", "warning")
    cluster = LocalCluster(args.model, most, workdir, threads=args.threads,
                           serve_args=serve_args, router_args=router_args, port=0)
    print(f"starting {most} replica(s) with {args.threads} thread(s) each and "
          f"{len(args.replica_counts)} router(s); logs in {workdir}", file=sys.stderr,
          flush=True)
    cluster.start()
    routers: list[RouterProcess] = []
    workers = replica_urls(cluster)
    urls = {DIRECT: workers[0], f"router-{most}": cluster.router.url}
    try:
        for n in args.replica_counts:
            if n == most:
                continue
            router = RouterProcess(workers[:n], args=router_args,
                                   log_path=workdir / f"router-{n}.log")
            routers.append(router)
            router.start()
            router.wait_ready()
            urls[f"router-{n}"] = router.url
    except BaseException:
        for router in routers:
            router.stop()
        cluster.stop()
        raise
    return cluster, routers, Targets(urls, workers)


# ---- the report ------------------------------------------------------------------------------

def label(name: str) -> str:
    if name == DIRECT:
        return "1 replica, direct"
    n = replicas_of(name)
    return f"{n} replica{'s' if n > 1 else ''} via router"


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    s, rows, lat, load = (report["settings"], report["configurations"],
                          report["router_latency_c1"], report["router_under_load"])
    cores = report["machine"]["cpus"]
    most = max(s["replica_counts"])
    lines = [
        f"# Scaling across replicas through sglang-router ({s['model']})", "",
        f"{report['rounds_done']} round(s). Streamed chat requests, greedy, `ignore_eos`, "
        f"{s['max_tokens']} output tokens each, prompts of {s['input_len']} words unique per "
        f"request; {s['concurrency']} in flight and {s['requests']} requests per replica "
        f"(N replicas: c = {s['concurrency']}N, {s['requests']}N requests). Replicas "
        f"`--threads {s['threads']} --parallel {s['concurrency']} --ctx {s['ctx']}`, router "
        f"policy `{s['policy']}`. The configurations take turns in each round, the order "
        f"rotated every round; tok/s and req/s are medians over rounds, \"vs 1\" the median of "
        f"each round's ratio to the 1-replica router figure, TTFT and ITL percentiles over all "
        f"rounds' requests.", "",
        "| configuration | c | output tok/s | req/s | tok/s vs 1 | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | tokens per replica | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in rows.items():
        share = " / ".join(f"{100 * x:.0f}%" for x in row["replica_token_share"]) or "-"
        lines.append(
            f"| {label(name)} | {row['concurrency']} | {_f(row['output_tok_s'])} | "
            f"{_f(row['req_s'], '.2f')} | {_f(row['vs_baseline']['output_tok_s'], '.2f')} | "
            f"{_f(row['ttft_ms']['p50'])} | {_f(row['ttft_ms']['p99'])} | "
            f"{_f(row['itl_ms']['p50'])} | {_f(row['itl_ms']['p99'])} | {share} | "
            f"{row['failed']} |")
    interval = lat["median_diff_interval_ms"]
    lines += [
        "", "## The router's added latency", "",
        f"- c=1, {lat['pairs']} pairs of one request to replica 0 directly and one through a "
        f"router in front of replica 0 alone, back to back, the order alternating "
        f"({s['latency_input_len']}-word prompts, {s['latency_max_tokens']} tokens): the "
        f"median of the per-pair TTFT differences is **{_f(lat['median_diff_ms'], '+.2f')} "
        f"ms**" + (f" (95% interval {interval[0]:+.2f} to {interval[1]:+.2f} ms)"
                   if interval else "") +
        f"; TTFT p50 {_f(lat['direct_p50_ms'], '.2f')} ms direct, "
        f"{_f(lat['router_p50_ms'], '.2f')} ms through the router"
        + (f"; {report['pair_failures']} failed" if report["pair_failures"] else "") + ".",
        f"- At the scaling load (c={s['concurrency']}), router-1 against direct: output tok/s "
        f"ratio {_f(load['output_tok_s_ratio'], '.3f')} (median of rounds; per round "
        f"{', '.join(f'{x:.3f}' for x in load['output_tok_s_ratio_per_round']) or '-'}), "
        f"TTFT p50 {_f(load['ttft_p50_diff_ms'], '+.1f')} ms, ITL p50 "
        f"{_f(load['itl_p50_ms']['direct'], '.2f')} ms direct against "
        f"{_f(load['itl_p50_ms']['router'], '.2f')} ms.",
        "", "## Reading it", "",
    ]
    if most * s["threads"] > cores:
        lines.append(
            f"- This machine has {cores} CPU cores, shared by the replicas, the routers and "
            f"this load generator: {most} replicas of {s['threads']} thread(s) each "
            f"oversubscribe it, so the {most}-replica figure shows where the cores run out, "
            f"not how replicas scale on a machine with a core per replica.")
    loads = report["machine"]["loadavg_per_round"]
    if loads:
        flat = [x for pair in loads for x in pair]
        lines.append(f"- 1-minute load average at the start and end of the rounds: "
                     f"{min(flat):.1f} to {max(flat):.1f} on {cores} cores.")
    short = [name for name, row in rows.items() if row["output_tokens_min_max"]
             and row["output_tokens_min_max"] != [s["max_tokens"], s["max_tokens"]]]
    if short:
        lines.append(f"- Not every request generated {s['max_tokens']} tokens in: "
                     f"{', '.join(short)} (see the JSON's output_tokens_min_max).")
    lines.append("- Only the chat template's fixed opening is shared between prompts; every "
                 "configuration runs on the same replica processes, the others idle meanwhile.")
    return "\n".join(lines) + "\n"


def build_report(args: argparse.Namespace, rounds: Sequence[Round],
                 pairs: Sequence[tuple[float, float]], pair_failures: Sequence[str],
                 loads: Sequence[Sequence[float]]) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "settings": settings,
        "machine": {"cpus": os.cpu_count() or 1, "loadavg_per_round": [list(x) for x in loads]},
        "rounds_done": len(rounds),
        "configurations": scaling_summary(rounds),
        "router_latency_c1": router_latency(pairs),
        "router_latency_c1_diffs_ms": [round(b - a, 3) for a, b in pairs],
        "pair_failures": len(pair_failures),
        "pair_errors": sorted(set(pair_failures))[:5],
        "router_under_load": router_under_load(rounds),
        "rounds": [{name: lv.figures() for name, lv in r.items()} for r in rounds],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()  # SIGTERM stops the cluster too
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    md = ""

    def write(rounds: Sequence[Round], pairs: Sequence[tuple[float, float]],
              pair_failures: Sequence[str], loads: Sequence[Sequence[float]]) -> None:
        nonlocal md
        report = build_report(args, rounds, pairs, pair_failures, loads)
        Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
        md = markdown(report)
        Path(f"{out}.md").write_text(md)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cluster-scaling-"))
    try:
        cluster, routers, targets = start(args, workdir)
        print(f"started in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        try:
            asyncio.run(run_rounds(targets, args, write))
        finally:
            for router in reversed(routers):
                router.stop()
            cluster.stop()
    except BaseException:
        print(f"the processes' logs are kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    print(md)
    print(f"wrote {out}.json and .md in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
