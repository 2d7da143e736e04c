"""Property-based fuzzing of every operation in /openapi.json, every dialect, with schemathesis:
valid bodies (positive) and bodies that break the schema (negative) against the real server.
Checks: no 5xx, and every response that the schema describes conforms to it.

Bounded so the suite keeps its time: a few examples per operation and mode, derandomized (the
same cases every run, so the test cannot flake), no shrinking, and every generation capped at
MAX_TOKENS tokens whatever the case asked for. Failures are collected, not raised, so one run
reports them all. Run with -s to see the counts."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

# Per operation and generation mode. A longer, random exploration (not for CI):
# LMSERVE_FUZZ_EXAMPLES=100 LMSERVE_FUZZ_RANDOM=1 pytest -s tests/model/test_fuzz_openapi.py
EXAMPLES = int(os.environ.get("LMSERVE_FUZZ_EXAMPLES", "6"))
DERANDOMIZE = not os.environ.get("LMSERVE_FUZZ_RANDOM")
MAX_TOKENS = 8
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Where each operation keeps its length limit: (the object holding it, the field). An absent
# limit means "up to the context" in most dialects, so the cap is set when a case leaves it
# out too. Operations that generate and are not listed here fail the test.
LIMITS = {
    "/v1/chat/completions": (None, "max_tokens"), "/v1/completions": (None, "max_tokens"),
    "/v1/responses": (None, "max_output_tokens"), "/v1/messages": (None, "max_tokens"),
    "/api/chat": ("options", "num_predict"), "/api/generate": ("options", "num_predict"),
    "/generate": ("sampling_params", "max_new_tokens"),
    "/v1/prompt": ("generation", "max_new_tokens"),
    "/v1/prompt/stream": ("generation", "max_new_tokens"),
    "/v1/sessions": ("generation", "max_new_tokens"),
    "/v1/sessions/{session_id}/prompt": ("generation", "max_new_tokens"),
    "/v1/sessions/{session_id}/prompt/stream": ("generation", "max_new_tokens"),
    "/models/smollm2/query/": ("params", "max_tokens"),
    "/models/smollm2/stream/": ("params", "max_tokens"),
    "/models/smollm2/": ("params", "max_tokens"),  # PUT: the defaults later requests get
}
MAX_CHOICES = 2  # n, best_of


def _bound(path: str, body: Any) -> None:
    """Keep a generation short: cap (or set) its length limit and its number of choices."""
    if path not in LIMITS or not isinstance(body, dict):
        return
    outer, field = LIMITS[path]
    holders = [body] if outer is None else body.setdefault(outer, {})
    for holder in holders if isinstance(holders, list) else [holders]:  # SGLang: one a prompt
        if not isinstance(holder, dict):
            continue  # a broken value: the server refuses it
        value = holder.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_TOKENS:
            holder[field] = MAX_TOKENS
        if field == "max_tokens":
            holder.pop("max_completion_tokens", None)
        for key in ("n", "best_of"):
            if isinstance(holder.get(key), int) and holder[key] > MAX_CHOICES:
                holder[key] = MAX_CHOICES
    if isinstance(body.get("n"), int) and body["n"] > MAX_CHOICES:
        body["n"] = MAX_CHOICES


@pytest.fixture()
def native_defaults(server) -> Iterator[None]:
    """PUT on the native resource replaces its default parameters, which the shared server
    keeps for later tests: they are put back afterwards."""
    url = f"{server.url}/models/smollm2/"
    before = httpx.get(url).json()["params"]
    yield
    httpx.put(url, json={"params": before}).raise_for_status()


def _fuzz(operation: Any, mode: GenerationMode, examples: collections.Counter[str],
          failures: list[str]) -> None:
    @settings(max_examples=EXAMPLES, derandomize=DERANDOMIZE, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        _bound(operation.path, case.body)
        try:
            response = case.call(timeout=60)
        except requests.RequestException as exc:  # no answer (a hang) is a failure too
            failures.append(f"{operation.label} [{mode.value}]: {exc!r}\n"
                            f"  {case.as_curl_command()[:600]}")
            return
        examples[operation.label] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error,
                                                     response_schema_conformance])
        except (AssertionError, BaseExceptionGroup) as exc:  # a check failed (FailureGroup)
            failures.append(f"{operation.label} [{mode.value}] {response.status_code}: "
                            f"{str(exc)[:600]}\n  {case.as_curl_command()[:600]}")

    try:
        run()
    except Unsatisfiable:  # nothing to break in an operation without inputs
        pass


def test_every_operation_survives_fuzzing(server, native_defaults) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    examples: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operations += 1
        for mode in MODES:
            _fuzz(result.ok(), mode, examples, failures)
    total = sum(examples.values())
    print(f"\nschemathesis: {operations} operations, {total} requests, "
          f"{len(failures)} failures")
    assert operations >= 50 and total >= operations * EXAMPLES
    assert not failures, "\n\n".join(failures[:20])
