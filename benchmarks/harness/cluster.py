"""What the cluster benchmarks (cluster_locality, cluster_scaling) read from a local cluster
started by lmserve.cluster.LocalCluster: the replicas' token counters from their /metrics and
the router's routing counters from its Prometheus port."""

from __future__ import annotations

import re
import signal
import sys

import httpx

from lmserve.cluster import Child, LocalCluster

REPLICA_METRICS = ("lmserve_generated_tokens_total", "lmserve_prompt_tokens_total",
                   "lmserve_prefix_cache_tokens_total")


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of `name` (over its label sets) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def replica_counters(url: str) -> dict[str, float]:
    """A replica's REPLICA_METRICS, each summed over its label sets."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {name: metric_sum(text, name) for name in REPLICA_METRICS}


def router_counters(metrics_url: str) -> dict[str, float]:
    """The router's routing counters: its selections, each worker's answered requests
    (smg_worker_cb_outcomes_total in 0.3.2) and cache-aware hits, misses and load-balancing
    events where a version exports them; {} when it answers nothing."""
    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not re.search(r"selection_total|cb_outcomes_total|"
                                                 r"cache_(hit|miss)|load_balanc", line):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def router_metrics_url(router: Child) -> str | None:
    """Where a router started by lmserve.cluster (RouterProcess) serves its Prometheus page."""
    argv = router.argv
    if "--prometheus-port" not in argv:
        return None
    port = argv[argv.index("--prometheus-port") + 1]
    return f"http://127.0.0.1:{port}/metrics"


def replica_urls(cluster: LocalCluster) -> list[str]:
    return [c.url for c in cluster.children if c.name.startswith("replica")]


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks stop the clusters (a background job
    started by a shell ignores SIGINT)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
