"""The issue 19 suite: lmserve against llama-server, workload by workload, in paired rounds.

    .venv/bin/python -m benchmarks.workloads.run [--workloads multiturn,shared_prefix,...]
        [--rounds 2] [--model smollm2] [--quick]        (or: make bench-peers)

For each workload both servers are started with the same model, threads, parallel slots,
context per slot and tokens per decode call (benchmarks.peers.servers), each with its best
documented flags for that workload (FLAGS below), and both idle while the other runs. Every
round runs the workload on each server in turn (the order alternates round by round) with
texts drawn from that round's seed: the two servers see the same prompts, and no round
warms a cache for the next. Ratios are lmserve / llama-server within a round; the report
gives their median over rounds. "restart" stops and starts each server between a warm-up
request and the measured questions of the same document.

Results: benchmarks/results/workloads-MODEL.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.procs import free_port, start_process, stop, wait_ready
from benchmarks.peers import servers
from benchmarks.peers.common import RESULTS, WORKDIR, log
from benchmarks.workloads import defs
from benchmarks.workloads.client import MODELS, Result, chat, percentile
from lmserve.models.resolve import resolve

# Goodput: a request counts when its TTFT and its own p99 inter-token gap both meet these.
TTFT_TARGET = 3.0
ITL_TARGET = 0.5

# Each server's flags for a workload, beside the shared engine settings.
FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    # lmserve keeps --cache-slots idle conversations resident (default: a quarter of
    # --parallel); for the conversation workloads it keeps the others' states in its RAM tier
    # (--cache-ram, the size of llama-server's default RAM prompt cache), as llama-server does.
    "lmserve": {"edit": ("--lookup", "8"), "multiturn": ("--cache-ram", "8G"),
                "agents": ("--cache-ram", "8G")},
    # Session 9's way: a KV stream per conversation (--kv-split; with 56 slots of 4096 cells
    # the auto layout would fall back to one shared pool, whose idle budget evicts them).
    "lmserve-slots": {"edit": ("--lookup", "8"),
                      "multiturn": ("--kv-split", "--cache-slots", "48"),
                      "agents": ("--kv-split", "--cache-slots", "16")},
    "llama-server": {
        # its prompt cache in RAM (--cache-ram, on by default at 8192 MiB) and KV shifting
        # for reuse of chunks past the first difference; --jinja for tool calls
        "multiturn": ("--cache-reuse", "256"),
        "shared_prefix": ("--cache-reuse", "256"),
        "agents": ("--cache-reuse", "256"),
        "edit": ("--spec-type", "ngram-simple"),
        "restart": ("--cache-reuse", "256"),
    },
}
# SmolLM2's own chat template renders no tools: llama-server then drops them (its prompt holds
# no tool list, and tool_choice forces nothing), while lmserve writes its fallback tool prompt
# and forces the call, so the agents workload compared unlike prompts. Both servers now serve
# it under one ChatML template that renders the tools and calls (Hermes style), which both
# read as a tool-call format.
TOOL_TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools.jinja"
TOOL_TEMPLATE_MODELS = ("smollm2",)  # models (by file name) served under TOOL_TEMPLATE


def tool_template_flags(name: str, model: str, workload: str) -> tuple[str, ...]:
    if workload != "agents" or not any(m in Path(model).name.lower()
                                       for m in TOOL_TEMPLATE_MODELS):
        return ()
    flag = "--chat-template" if name.startswith("lmserve") else "--chat-template-file"
    return (flag, str(TOOL_TEMPLATE))


ALL = ("uniform", "multiturn", "shared_prefix", "long_decode", "agents", "edit", "restart")
QUICK = defs.Scale(conversations=8, turns=3, questions=16, decode_seconds=30.0, agents=4,
                   agent_steps=3, edit_requests=4, uniform_levels=(1, 8))


@dataclass
class Figures:
    requests: int
    failed: int
    wall: float
    req_s: float
    out_tok_s: float
    goodput: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    cached_share: float
    prompt_tokens: int
    by_kind: dict[str, dict[str, float]]


def figures(outcome: defs.Outcome, itl_kind: str | None = None) -> Figures:
    ok = [r for r in outcome.results if r.ok]
    timed = [r for r in ok if itl_kind is None or r.kind == itl_kind]
    gaps = [g for r in timed for g in r.gaps]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    good = sum(1 for r in ok if r.ttft is not None and r.ttft <= TTFT_TARGET
               and r.itl_p99() <= ITL_TARGET)
    wall = max(outcome.wall, 1e-9)
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({r.kind for r in ok}):
        rs = [r for r in ok if r.kind == kind]
        span = max(r.end for r in rs) - min(r.start for r in rs)
        k_ttft = [r.ttft for r in rs if r.ttft is not None]
        by_kind[kind] = {"requests": len(rs), "out_tok_s": sum(r.output_tokens for r in rs) / span,
                         "ttft_p50": percentile(k_ttft, 50),
                         "itl_p99": percentile([g for r in rs for g in r.gaps], 99)}
    return Figures(
        requests=len(ok), failed=len(outcome.results) - len(ok), wall=wall,
        req_s=len(ok) / wall, out_tok_s=sum(r.output_tokens for r in ok) / wall,
        goodput=good / wall, ttft_p50=percentile(ttfts, 50), ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99), itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
        cached_share=sum(r.cached_tokens for r in ok) / max(prompt, 1),
        prompt_tokens=prompt, by_kind=by_kind)


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Server:
    """One server of the pair for one workload: its command, process and base URL."""

    def __init__(self, name: str, model: str, workload: str, settings: servers.Settings,
                 state_dir: Path) -> None:
        self.name, self.port = name, free_port()
        extra = FLAGS.get(name, {}).get(workload, ())
        template = tool_template_flags(name, model, workload)
        if name.startswith("lmserve"):
            if name == "lmserve-before":  # the scheduler before session 9's two changes
                extra = (*FLAGS["lmserve"].get(workload, ()), "--mixed-prefill", "0",
                         "--prefix-wait", "0")
            if workload == "restart":
                extra = (*extra, "--disk-cache", str(state_dir / "lmserve-disk-cache"))
            self.spec = servers.lmserve(model, self.port, settings, name=name,
                                        extra=(*extra, *template))
        else:
            self.spec = servers.llama_server(model, self.port, settings,
                                             servers.llama_server_binary())
            self.spec.command += ["--jinja", *extra, *template]
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Any = None
        self.peak: float = 0.0
        self.ram_tier: float = 0.0  # MiB of lmserve's --cache-ram states (tmpfs, not in RSS)

    def start(self) -> None:
        WORKDIR.mkdir(parents=True, exist_ok=True)
        self.proc = start_process(self.spec.command, WORKDIR / f"workload-{self.name}.log")
        wait_ready(self.proc, self.base + self.spec.ready_path, timeout=600)
        models = httpx.get(self.base + "/v1/models", timeout=30).json()["data"]
        MODELS[self.base] = models[0]["id"]

    def stop(self) -> None:
        if self.proc is not None:
            self.peak = max(self.peak, peak_rss_mib(self.proc.pid) or 0.0)
            self.ram_tier = max(self.ram_tier, self._ram_tier_mib())
            stop(self.proc)
            self.proc = None


    def _ram_tier_mib(self) -> float:
        """What lmserve's RAM tier holds now (its states live in /dev/shm, outside the RSS)."""
        if not self.name.startswith("lmserve"):
            return 0.0
        try:
            text = httpx.get(self.base + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("lmserve_ram_cache_bytes{")) / 2**20


async def _restart_round(server: Server, client: httpx.AsyncClient, seed: int,
                         scale: defs.Scale) -> defs.Outcome:
    """Warm the server with one question on a document, restart it, then ask scale.questions
    new questions on the same document at c=8 (lmserve keeps the prefix in its disk cache;
    llama-server's prompt cache lives in RAM)."""
    import random
    rng = random.Random(seed)
    doc = defs._document(rng, seed, scale.doc_words)
    warm = await chat(client, server.base, {"messages": [
        {"role": "system", "content": doc}, {"role": "user", "content": "Question 0: why?"}],
        "max_tokens": 8, "temperature": 0}, kind="warm-up")
    if not warm.ok:
        raise RuntimeError(f"{server.name} warm-up failed: {warm.error}")
    await asyncio.sleep(3.0)  # the disk cache writes off the engine thread
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)
    questions = [f"Question {i}: {defs.words(rng, rng.randint(10, 30))}?"
                 for i in range(1, scale.questions + 1)]
    results: list[Result] = []

    async def ask(q: str) -> None:
        results.append(await chat(client, server.base, {"messages": [
            {"role": "system", "content": doc}, {"role": "user", "content": q}],
            "max_tokens": 32, "temperature": 0}, kind="question"))

    t0 = time.monotonic()
    await defs.closed_loop([lambda q=q: ask(q) for q in questions], 8)
    return defs.Outcome(results, time.monotonic() - t0)


RATIO_KEYS = ("req_s", "out_tok_s", "goodput", "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50",
              "itl_p99", "cached_share")


async def run_workload(name: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    scale: defs.Scale = args.scale
    names = args.servers
    state = Path(tempfile.mkdtemp(prefix="lmserve-workloads-"))
    pair = {n: Server(n, model, name, args.settings, state) for n in names}
    for s in pair.values():
        s.start()
    rounds: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            for r in range(args.rounds):
                seed = args.seed * 1000 + r * 37 + ALL.index(name)
                order = names if r % 2 == 0 else list(reversed(names))
                per: dict[str, Any] = {}
                for n in order:
                    t = time.monotonic()
                    if name == "restart":
                        outcome = await _restart_round(pair[n], client, seed, scale)
                    else:
                        outcome = await defs.WORKLOADS[name](client, pair[n].base, seed, scale)
                    fig = figures(outcome, "decoder" if name == "long_decode" else None)
                    per[n] = {"figures": asdict(fig), "notes": outcome.notes,
                              "errors": sorted({r.error or "" for r in outcome.results
                                                if not r.ok})[:3]}
                    log(f"{name} round {r} {n}: {fig.requests} ok {fig.failed} failed, "
                        f"{fig.req_s:.2f} req/s, {fig.out_tok_s:.1f} tok/s, TTFT p90 "
                        f"{fig.ttft_p90:.2f} s, ITL p99 {fig.itl_p99:.3f} s, cached "
                        f"{fig.cached_share:.2f} ({time.monotonic() - t:.0f} s)")
                rounds.append(per)
    finally:
        for s in pair.values():
            s.stop()
    return {"workload": name, "rounds": rounds,
            "peak_rss_mib": {n: s.peak for n, s in pair.items()},
            "ram_tier_mib": {n: s.ram_tier for n, s in pair.items()},
            "flags": {n: list(pair[n].spec.command[1:]) for n in names},
            "summary": summarize(rounds, names)}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"median": {}, "ratio": {}}
    for n in names:
        out["median"][n] = {k: _median([r[n]["figures"][k] for r in rounds])
                            for k in (*RATIO_KEYS, "requests", "failed")}
    if len(names) == 2:
        a, b = names
        for k in RATIO_KEYS:
            ratios = [r[a]["figures"][k] / r[b]["figures"][k] for r in rounds
                      if r[b]["figures"][k]]
            out["ratio"][k] = _median(ratios)
            out["ratio"][k + "_rounds"] = ratios
        kinds = sorted(set(rounds[0][a]["figures"]["by_kind"]) if rounds else set())
        out["ratio"]["by_kind_out_tok_s"] = {
            kind: _median([r[a]["figures"]["by_kind"][kind]["out_tok_s"]
                           / r[b]["figures"]["by_kind"][kind]["out_tok_s"] for r in rounds
                           if kind in r[b]["figures"]["by_kind"]]) for kind in kinds}
    return out


def _f(v: float | None, d: int = 2) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(data: dict[str, Any]) -> str:
    names = data["servers"]
    lines = [f"# Workloads, {data['model']} ({data['date']}, {data['rounds']} paired rounds)", "",
             f"Settings: {data['settings']}; goodput targets TTFT <= {TTFT_TARGET} s and the "
             f"request's own p99 inter-token gap <= {ITL_TARGET} s. Ratios are "
             f"{names[0]} / {names[-1]}, medians of per-round ratios.", "",
             "| workload | " + " | ".join(f"{n} req/s, tok/s, TTFT p50/p90, ITL p50/p99, cached, "
                                         "peak RSS" for n in names)
             + " | req/s | tok/s | goodput | TTFT p90 | ITL p99 | cached |",
             "|---|" + "---|" * len(names) + "---|---|---|---|---|---|"]
    for w in data["workloads"]:
        cells = []
        for n in names:
            m = w["summary"]["median"][n]
            cells.append(f"{_f(m['req_s'])}, {_f(m['out_tok_s'], 1)}, {_f(m['ttft_p50'])}/"
                         f"{_f(m['ttft_p90'])} s, {_f(m['itl_p50'] * 1000, 0)}/"
                         f"{_f(m['itl_p99'] * 1000, 0)} ms, {_f(m['cached_share'])}, "
                         f"{_f(w['peak_rss_mib'][n], 0)} MiB"
                         + (f" + {_f(tier, 0)} MiB RAM tier"
                            if (tier := w.get("ram_tier_mib", {}).get(n)) else ""))
        r = w["summary"]["ratio"]
        lines.append(f"| {w['workload']} | " + " | ".join(cells) + " | " + " | ".join(
            _f(r.get(k)) for k in ("req_s", "out_tok_s", "goodput", "ttft_p90", "itl_p99",
                                   "cached_share")) + " |")
    lines.append("")
    for w in data["workloads"]:
        kinds = w["summary"]["ratio"].get("by_kind_out_tok_s") or {}
        if w["workload"] in ("uniform", "edit") and kinds:
            lines.append(f"{w['workload']}: output tok/s ratio by level: " + ", ".join(
                f"{k} {_f(v)}" for k, v in kinds.items()))
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    work = [w["workload"] for w in data["workloads"]]
    keys = [("req_s", "requests/s"), ("out_tok_s", "output tok/s"), ("ttft_p90", "TTFT p90"),
            ("itl_p99", "ITL p99")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for i, (k, label) in enumerate(keys):
        vals = [w["summary"]["ratio"].get(k) or 0 for w in data["workloads"]]
        ax.bar([x + i * width for x in range(len(work))], vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 1.5 * width for x in range(len(work))], work)
    ax.set_ylabel(f"{data['servers'][0]} / {data['servers'][-1]}")
    ax.set_title(f"{data['model']}: median per-round ratios ({data['rounds']} rounds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--workloads", default=",".join(ALL))
    p.add_argument("--servers", default="lmserve,llama-server",
                   help="two of lmserve, llama-server, lmserve-before (lmserve with "
                        "--mixed-prefill 0 --prefix-wait 0), lmserve-slots (conversations kept "
                        "in KV streams rather than the RAM tier); ratios are first / second")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                   help="texts are drawn from it (default: the clock, so a rerun is cold)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--ctx-per-seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="small sizes, to check the suite runs")
    p.add_argument("--lmserve-flags", default="",
                   help="extra lmserve flags for every workload (space-separated)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(ALL)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    args.servers = [s for s in args.servers.split(",") if s]
    args.settings = servers.Settings(args.threads, args.parallel, args.ctx_per_seq, args.batch)
    args.scale = QUICK if args.quick else defs.Scale()
    if args.lmserve_flags:
        extra = tuple(args.lmserve_flags.split())
        FLAGS["lmserve"] = {w: (*FLAGS["lmserve"].get(w, ()), *extra) for w in ALL}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "llama-server" in args.servers and not servers.PEER_PY.exists():
        log(f"peers not installed: run benchmarks/peers/install_peers.sh ({servers.PEER_PY})")
        return 2
    path = resolve(args.model).path
    data: dict[str, Any] = {"model": args.model, "path": path, "date": time.strftime("%Y-%m-%d"),
                            "rounds": args.rounds, "servers": args.servers, "seed": args.seed,
                            "settings": asdict(args.settings),
                            "scale": asdict(args.scale), "workloads": []}
    tag = f"workloads-{args.model}{'-' + args.tag if args.tag else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for w in args.workloads:
        log(f"== {w}")
        data["workloads"].append(asyncio.run(run_workload(w, path, args)))
        (args.out_dir / f"{tag}.json").write_text(json.dumps(data, indent=1))
        (args.out_dir / f"{tag}.md").write_text(markdown(data))
    plot(data, args.out_dir / f"{tag}.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

