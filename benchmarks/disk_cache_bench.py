"""Disk cache across a restart: TTFT of a request whose long prefix is on disk, vs cold.

    python -m benchmarks.disk_cache_bench [--model smollm2] [--prefix-tokens 2000] [--docs 3]

Starts `lmserve serve --disk-cache DIR`, sends each document (a long prefix) plus a question
(cold: the prefix is computed, then saved when the request finishes), stops the server, starts
a new one on the same directory and sends each document with another question (warm: the
prefix is loaded from disk). Reports median TTFT of both and the ratio warm/cold (target:
at most 0.20). Results go to benchmarks/results/disk-cache-*.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness.engine_metrics import counter_total
from benchmarks.harness.procs import free_port, start_lmserve, stop

RESULTS = Path(__file__).parent / "results"
SENTENCE = ("Entry {i}: the survey team measured plot {j} at {k} metres and noted {m} oak "
            "seedlings beside the eastern drainage ditch. ")


def document(n_words: int, seed: int) -> str:
    parts, i = [], 0
    while sum(len(p.split()) for p in parts) < n_words:
        parts.append(SENTENCE.format(i=i + seed * 1000, j=(i * 7 + seed) % 53,
                                     k=(i * 11 + seed) % 89, m=(i * 5 + seed) % 17))
        i += 1
    return "".join(parts)


def ttft(base: str, model: str, prompt: str) -> tuple[float, int, int]:
    """(seconds to the first streamed token, prompt tokens, cached tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), 0.0, {}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and not first:
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return first, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def saves(base: str) -> float:
    return counter_total(httpx.get(f"{base}/metrics").text, "lmserve_disk_cache_saves")


def run_phase(args: argparse.Namespace, cache_dir: str, question: str, wait_saves: bool) -> list:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_lmserve(args.model, port, "--threads", str(args.threads), "--parallel", "4",
                         "--ctx", "8192", "--disk-cache", cache_dir, "--store", "memory")
    try:
        rows = []
        for seed in range(args.docs):
            prompt = document(int(args.prefix_tokens * 0.72), seed) + question
            rows.append(ttft(base, args.model, prompt))
        deadline = time.monotonic() + 120
        while wait_saves and saves(base) < args.docs and time.monotonic() < deadline:
            time.sleep(0.2)
        return rows
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--tag", default="disk-cache")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_phase(args, cache_dir, "\nQuestion: which plot was largest?\nAnswer:", True)
        warm = run_phase(args, cache_dir, "\nQuestion: how many seedlings?\nAnswer:", False)
    cold_ttft = statistics.median(r[0] for r in cold)
    warm_ttft = statistics.median(r[0] for r in warm)
    summary = {"model": args.model, "threads": args.threads,
               "prompt_tokens": [r[1] for r in warm], "cached_after_restart": [r[2] for r in warm],
               "cold_ttft_s": round(cold_ttft, 3), "warm_ttft_s": round(warm_ttft, 3),
               "warm_over_cold": round(warm_ttft / cold_ttft, 3)}
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}-{args.model}.json").write_text(
        json.dumps({"summary": summary, "cold": cold, "warm": warm}, indent=2))


if __name__ == "__main__":
    main()
