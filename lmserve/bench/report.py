"""Reporting: a text table, JSON (and back) and a comparison plot."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmserve.bench.scenarios import SweepResult
from lmserve.bench.stats import LevelResult, Stats

_COLUMNS: list[tuple[str, int]] = [
    ("conc", 5), ("done", 5), ("fail", 5), ("req/s", 8), ("tok/s", 9),
    ("TTFT mean", 10), ("p50", 9), ("p99", 9),
    ("ITL mean", 9), ("p50", 8), ("p99", 8),
    ("TPOT mean", 10), ("p50", 8), ("p99", 8),
]  # fmt: skip


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(level: LevelResult) -> list[str]:
    cells = [
        str(level.concurrency),
        str(level.completed),
        str(level.failed),
        _num(level.request_throughput, 2),
        _num(level.output_throughput, 1),
    ]
    for stats in (level.ttft, level.itl, level.tpot):
        cells += [_num(stats.mean, 1), _num(stats.p50, 1), _num(stats.p99, 1)]
    return cells


def format_table(result: SweepResult) -> str:
    """Fixed-width table, one row per concurrency level; latencies in ms."""
    lines = [
        f"backend: {result.backend}   input ~{result.input_len} tok   "
        f"output {result.output_len} tok   (latencies in ms)"
    ]
    lines.append(" ".join(title.rjust(width) for title, width in _COLUMNS))
    lines.append(" ".join("-" * width for _, width in _COLUMNS))
    for level in result.levels:
        lines.append(" ".join(c.rjust(w) for c, (_, w) in zip(_row(level), _COLUMNS, strict=True)))
    for level in result.levels:
        for err in level.errors:
            lines.append(f"error at concurrency {level.concurrency}: {err}")
    if result.shared_prefix is not None:
        lines.append(format_shared_prefix(result.shared_prefix))
    return "\n".join(lines)


def format_shared_prefix(report: Mapping[str, Any]) -> str:
    """One paragraph summarising a shared_prefix() report."""
    ttfts = ", ".join(_num(t) for t in report["ttft_ms"])
    return (
        f"shared prefix ({report['prefix_len']} + {report['tail_len']} words, "
        f"{report['n']} sequential requests): TTFT ms [{ttfts}]; "
        f"first {_num(report['first_ttft_ms'])}, later mean "
        f"{_num(report['later_ttft_mean_ms'])}, ratio {_num(report['ratio'], 2)}"
        + (f"; {report['failed']} failed" if report.get("failed") else "")
    )


def _level_json(level: LevelResult, include_requests: bool) -> dict[str, Any]:
    out = {f.name: getattr(level, f.name) for f in dataclasses.fields(level)}
    out.pop("records")
    for key in ("ttft", "itl", "tpot"):
        out[key + "_ms"] = dataclasses.asdict(out.pop(key))
    out["errors"] = list(level.errors)
    if include_requests:
        out["requests"] = [r.to_json() for r in level.records]
    return out


def to_json(result: SweepResult, include_requests: bool = False) -> dict[str, Any]:
    """A JSON-serialisable dict of the sweep; per-request rows only if asked for."""
    return {
        "backend": result.backend,
        "input_len": result.input_len,
        "output_len": result.output_len,
        "levels": [_level_json(level, include_requests) for level in result.levels],
        "shared_prefix": result.shared_prefix,
    }


def from_json(data: Mapping[str, Any]) -> SweepResult:
    """Rebuild a SweepResult (without per-request records) from to_json() output."""
    levels = []
    for raw in data["levels"]:
        fields = {k: v for k, v in raw.items() if k not in ("requests",)}
        for key in ("ttft", "itl", "tpot"):
            fields[key] = Stats(**fields.pop(key + "_ms"))
        levels.append(LevelResult(**fields))
    return SweepResult(
        backend=data["backend"],
        input_len=data["input_len"],
        output_len=data["output_len"],
        levels=levels,
        shared_prefix=data.get("shared_prefix"),
    )


def plot(results: Mapping[str, SweepResult], path: str | Path) -> Path:
    """Write a PNG comparing named sweeps: output tok/s, TTFT p50 and TPOT p50 vs concurrency."""
    from matplotlib.figure import Figure  # optional dependency (extra "bench")

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    panels: list[tuple[str, Callable[[LevelResult], float | None]]] = [
        ("output tokens/s", lambda lv: lv.output_throughput),
        ("TTFT p50 (ms)", lambda lv: lv.ttft.p50),
        ("TPOT p50 (ms)", lambda lv: lv.tpot.p50),
    ]
    concurrencies: set[int] = set()
    for ax, (title, metric) in zip(axes, panels, strict=True):
        for label, result in results.items():
            points = [(lv.concurrency, metric(lv)) for lv in result.levels]
            points = [(c, v) for c, v in points if v is not None]
            concurrencies.update(c for c, _ in points)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
    for ax in axes:
        if concurrencies:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(concurrencies), [str(c) for c in sorted(concurrencies)])
        ax.set_ylim(bottom=0)
    if results:
        axes[0].legend()
    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    return out
