"""What run_peers.py and paired.py share: where results and server logs go, logging, and the
command-line options that make the servers' settings and the load."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.peers import servers

RESULTS = servers.ROOT / "benchmarks" / "results"
WORKDIR = RESULTS / "tmp" / "peers"  # server configs and logs


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def add_arguments(p: argparse.ArgumentParser, *, servers_default: str, tag: str) -> None:
    """Models, servers, the engine settings (servers.Settings), the load, limits, output."""
    p.add_argument("--models", default="smollm2,gemma3-270m",
                   help="comma-separated model references (bundled names or GGUF paths)")
    p.add_argument("--servers", default=servers_default,
                   help=f"comma-separated subset of {','.join(servers.SERVERS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--ctx-per-seq", type=int, default=2048, help="context tokens per sequence")
    p.add_argument("--batch", type=int, default=512, help="tokens per decode call")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 8, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="default max(4, 2 x concurrency)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-read timeout, s")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="start-up limit, s")
    p.add_argument("--tag", default=tag, help="result file name (without extension)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, split the model and server lists, refuse unknown servers, build args.settings."""
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(servers.SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    args.settings = servers.Settings(args.threads, args.parallel, args.ctx_per_seq, args.batch)
    return args
