"""Command-line glue for the benchmark: `add_arguments(parser)` and `main(args)`.

Backends are created by name through BACKENDS; register another one with
`register_backend("name", factory)`, where `factory` is an async callable taking the
parsed argparse.Namespace and returning a Backend. `--backend name` selects it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from lmserve.bench.base import Backend
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.report import format_table, from_json, plot, to_json
from lmserve.bench.scenarios import SweepResult, shared_prefix, sweep
from lmserve.bench.stats import LevelResult

BackendFactory = Callable[[argparse.Namespace], Awaitable[Backend]]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `--backend name` build its Backend with `await factory(args)`."""
    BACKENDS[name] = factory


async def _openai_backend(args: argparse.Namespace) -> Backend:
    backend = OpenAIHTTPBackend(
        args.url,
        args.model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        max_connections=max(args.concurrency),
        timeout=args.timeout,
    )
    if not backend.model:  # ask the server which model it serves
        try:
            models = await backend.list_models()
        except Exception:  # noqa: BLE001 - many servers ignore "model"; go on without
            models = []
        backend.model = models[0] if models else None
    return backend


register_backend("openai", _openai_backend)


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        msg = f"not a comma-separated list of integers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to `parser`."""
    parser.add_argument("--backend", default="openai", help="backend name (default: openai)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default=None, help="model id (default: ask /v1/models)")
    parser.add_argument("--api-key", default=None, help="bearer token for the server")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument(
        "--concurrency", type=_concurrency_list, default=[1, 2, 4, 8, 16],
        help="comma-separated concurrency levels (default: 1,2,4,8,16)",
    )  # fmt: skip
    parser.add_argument("--input-len", type=int, default=128, help="prompt length, ~tokens")
    parser.add_argument("--output-len", type=int, default=128, help="tokens to generate")
    parser.add_argument(
        "--requests-per-level", type=int, default=None,
        help="requests per level (default: max(4, 2 x concurrency))",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests (default: 1)")
    parser.add_argument(
        "--timeout", type=float, default=None, help="per-read timeout, s (default: none)"
    )
    parser.add_argument(
        "--shared-prefix", action="store_true", help="also run the shared-prefix scenario"
    )
    parser.add_argument("--prefix-len", type=int, default=1000, help="shared prefix, ~tokens")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write PNG")
    parser.add_argument("--label", default=None, help="this run's name in the plot")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="LABEL=JSON",
        help="add an earlier --json result to the plot (repeatable)",
    )  # fmt: skip


def _progress(level: LevelResult) -> None:
    print(
        f"  concurrency {level.concurrency}: {level.completed}/{level.num_requests} ok, "
        f"{level.output_throughput:.1f} tok/s",
        file=sys.stderr,
        flush=True,
    )


async def _run(args: argparse.Namespace) -> SweepResult:
    backend = await BACKENDS[args.backend](args)
    try:
        print(f"benchmarking {backend.name} ...", file=sys.stderr, flush=True)
        result = await sweep(
            backend,
            concurrencies=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
            requests_per_level=args.requests_per_level,
            warmup=args.warmup,
            on_level=_progress,
        )
        if args.shared_prefix:
            result.shared_prefix = await shared_prefix(backend, prefix_len=args.prefix_len)
        return result
    finally:
        await backend.aclose()


def main(args: argparse.Namespace) -> int:
    """Run the sweep (and optional scenarios), print the table, write JSON/plot.

    Returns 0 when every request succeeded, 1 when some failed, 2 on bad arguments.
    """
    if args.backend not in BACKENDS:
        print(f"unknown backend {args.backend!r}; known: {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    compare: dict[str, SweepResult] = {}
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep:
            print(f"--compare wants LABEL=PATH, got {item!r}", file=sys.stderr)
            return 2
        compare[label] = from_json(json.loads(Path(path).read_text()))

    result = asyncio.run(_run(args))
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(result, include_requests=True), indent=2))
    if args.plot is not None:
        plot({args.label or result.backend: result, **compare}, args.plot)
    return 1 if result.failed or (result.shared_prefix or {}).get("failed") else 0


def run_cli(argv: list[str] | None = None) -> int:
    """Stand-alone entry: `python -m lmserve.bench.cli --url ...`."""
    parser = argparse.ArgumentParser(prog="lmserve bench", description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run_cli())
