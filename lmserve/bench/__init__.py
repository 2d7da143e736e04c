"""Benchmark harness: closed-loop load generation against any streaming Backend.

See `lmserve.bench.cli` for the command line and the backend registry.
"""

from lmserve.bench.base import Backend, BackendError, BenchRequest, Chunk
from lmserve.bench.openai_http import OpenAIHTTPBackend
from lmserve.bench.prompts import WORDS, make_prompts
from lmserve.bench.report import format_shared_prefix, format_table, from_json, plot, to_json
from lmserve.bench.runner import run_level, run_request
from lmserve.bench.scenarios import SweepResult, shared_prefix, sweep
from lmserve.bench.stats import LevelResult, RequestRecord, Stats, percentile

__all__ = [
    "WORDS",
    "Backend",
    "BackendError",
    "BenchRequest",
    "Chunk",
    "LevelResult",
    "OpenAIHTTPBackend",
    "RequestRecord",
    "Stats",
    "SweepResult",
    "format_shared_prefix",
    "format_table",
    "from_json",
    "make_prompts",
    "percentile",
    "plot",
    "run_level",
    "run_request",
    "shared_prefix",
    "sweep",
    "to_json",
]
