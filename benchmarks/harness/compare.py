"""Compare several servers' sweeps of one model: ratio tables (JSON and markdown).

Input: {server name: run}, where a run is a dict with "sweep" (report.to_json of a
SweepResult), optionally "shared_prefix" (scenarios.shared_prefix) and "length_check"
({"completion_tokens", "finish_reason", "expected"}), or "error" for a server that failed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from benchmarks.harness.engine_metrics import PHASES

Run = Mapping[str, Any]


def levels_by_concurrency(run: Run) -> dict[int, Mapping[str, Any]]:
    if "sweep" not in run:
        return {}
    return {int(level["concurrency"]): level for level in run["sweep"]["levels"]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ttft_p50(level: Mapping[str, Any] | None) -> float | None:
    return None if level is None else level["ttft_ms"]["p50"]


def ratios(runs: Mapping[str, Run], base: str = "lmserve",
           ttft_concurrency: int = 8) -> dict[str, dict[str, Any]]:
    """For each other server: base/peer output tok/s per concurrency, and TTFT p50 base/peer
    at `ttft_concurrency` (below 1: the base answers sooner)."""
    mine = levels_by_concurrency(runs.get(base, {}))
    out: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        if name == base:
            continue
        theirs = levels_by_concurrency(run)
        out[name] = {
            "output_tok_s": {
                c: _ratio(level["output_throughput"], theirs[c]["output_throughput"])
                for c, level in mine.items() if c in theirs
            },
            f"ttft_p50_c{ttft_concurrency}": _ratio(
                _ttft_p50(mine.get(ttft_concurrency)), _ttft_p50(theirs.get(ttft_concurrency))
            ),
        }
    return out


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _concurrencies(runs: Mapping[str, Run]) -> list[int]:
    return sorted({c for run in runs.values() for c in levels_by_concurrency(run)})


def _prefix_cell(run: Run) -> str:
    prefix = run.get("shared_prefix")
    if not prefix:
        return "-"
    return (f"{_num(prefix['first_ttft_ms'], 0)} / {_num(prefix['later_ttft_mean_ms'], 0)} "
            f"({_num(prefix['ratio'], 1)}x)")


def _span(levels: Mapping[int, Mapping[str, Any]], key: str) -> str:
    values = [lv.get(key) for lv in levels.values()]
    if not values or any(v is None for v in values):
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def _length_cell(run: Run, levels: Mapping[int, Mapping[str, Any]]) -> str:
    """The non-streamed length check, then mean output tokens per request over the levels
    (counted tokens, then tokens counted from stream chunks)."""
    check = run.get("length_check") or {}
    return (f"{check.get('completion_tokens', '-')} {check.get('finish_reason') or ''}; "
            f"{_span(levels, 'mean_output_tokens')} "
            f"({_span(levels, 'mean_streamed_tokens')} streamed)")


def absolute_table(runs: Mapping[str, Run], ttft_concurrency: int = 8) -> list[str]:
    cs = _concurrencies(runs)
    header = (["server"] + [f"tok/s c={c}" for c in cs]
              + [f"TTFT p50 c={ttft_concurrency} ms", f"TPOT p50 c={ttft_concurrency} ms",
                 "failed", "output tokens: check; per request",
                 "shared prefix TTFT ms cold / warm"])
    rows = []
    for name, run in runs.items():
        if "error" in run:
            rows.append([name, f"**failed**: {run['error']}"] + [""] * (len(header) - 2))
            continue
        levels = levels_by_concurrency(run)
        at = levels.get(ttft_concurrency)
        rows.append(
            [name] + [_num(levels[c]["output_throughput"]) if c in levels else "-" for c in cs]
            + [_num(_ttft_p50(at), 0), _num(at["tpot_ms"]["p50"] if at else None),
               str(sum(lv["failed"] for lv in levels.values())), _length_cell(run, levels),
               _prefix_cell(run)]
        )
    return _table(header, rows)


def ratio_table(runs: Mapping[str, Run], base: str = "lmserve",
                ttft_concurrency: int = 8) -> list[str]:
    table = ratios(runs, base, ttft_concurrency)
    cs = _concurrencies(runs)
    header = ([f"{base} / peer"] + [f"tok/s c={c}" for c in cs]
              + [f"TTFT p50 c={ttft_concurrency}"])
    rows = [[name] + [_num(r["output_tok_s"].get(c), 2) for c in cs]
            + [_num(r[f"ttft_p50_c{ttft_concurrency}"], 2)] for name, r in table.items()]
    return _table(header, rows)


def engine_table(run: Run) -> list[str]:
    """Per-step engine timings of a run whose levels were probed (lmserve's /metrics)."""
    header = (["c", "steps", "batch tokens/step", "generated/step"]
              + [f"{p} ms" for p in PHASES] + ["step ms"])
    rows = []
    for c, level in sorted(levels_by_concurrency(run).items()):
        engine = level.get("engine")
        if not engine:
            continue
        rows.append([str(c), str(engine["steps"]), _num(engine["batch_tokens_per_step"]),
                     _num(engine.get("generated_per_step"), 2)]
                    + [_num(engine["step_ms"][p], 3) for p in PHASES]
                    + [_num(engine["step_ms_total"], 2)])
    return _table(header, rows) if rows else []


def markdown(model: str, runs: Mapping[str, Run], bases: Sequence[str] | None = None,
             ttft_concurrency: int = 8) -> str:
    """One model's section: absolute numbers, ratios of each lmserve configuration (`bases`,
    default: every server named lmserve*) to each peer, per-step engine timings."""
    lines = [f"## {model}", "", "Output tokens/s per concurrency, latencies in ms.", ""]
    lines += absolute_table(runs, ttft_concurrency)
    if bases is None:
        bases = [name for name in runs if name.startswith("lmserve") and "error" not in runs[name]]
    for base in bases:
        compared = {name: run for name, run in runs.items()
                    if name == base or name not in bases}
        lines += ["", f"Ratios {base} / peer (tok/s above 1: {base} faster; "
                  f"TTFT below 1: {base} answers sooner).", ""]
        lines += ratio_table(compared, base, ttft_concurrency)
    for name, run in runs.items():
        engine = engine_table(run)
        if engine:
            lines += ["", f"{name}: engine time per step (from /metrics around each level).", ""]
            lines += engine
    return "\n".join(lines) + "\n"
