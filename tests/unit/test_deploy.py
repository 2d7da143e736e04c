"""deploy/: the compose file and the Kubernetes manifests parse, hold the probes and the command
lines the cluster tests run (tests/model/test_cluster.py, lmserve cluster), and nginx.conf
routes to upstreams it defines (`nginx -t` too, where nginx is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmserve.cluster import DEFAULT_ROUTER_ARGS, ROUTER_MODULE, replica_argv, router_argv
from tests.model.test_cluster import CLUSTER_SERVE_ARGS, REPLICA, ROUTER_ARGS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TESTED_SERVE = list(REPLICA[1:])  # what the cluster tests give each replica after the model


def documents(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def serve_command(argv: list[str], host: str, store: str) -> list[str]:
    """A replica's command as deploy/ writes it: `lmserve` for `python -m lmserve`."""
    assert argv[:2] == ["lmserve", "serve"], argv
    model = argv[2]
    expected = replica_argv(model, port=8000, store=store, host=host, threads=1,
                            extra=CLUSTER_SERVE_ARGS)
    return ["lmserve", *expected[3:]]


def test_the_tests_run_the_replicas_and_the_router_as_lmserve_cluster_does() -> None:
    assert ROUTER_ARGS == DEFAULT_ROUTER_ARGS
    assert TESTED_SERVE == ["--threads", "1", *CLUSTER_SERVE_ARGS]


def test_compose_runs_redis_replicas_router_and_nginx_with_the_tested_command_lines() -> None:
    (compose,) = documents("compose.yaml")
    services = compose["services"]
    assert {"redis", "replica-1", "replica-2", "router", "nginx"} <= set(services)
    store = "redis://redis:6379/0"
    for name in ("replica-1", "replica-2"):
        command = services[name]["command"]
        assert command == serve_command(command, "0.0.0.0", store)
        assert "/health/ready" in " ".join(services[name]["healthcheck"]["test"])
    router = services["router"]["command"]
    workers = ["http://replica-1:8000", "http://replica-2:8000"]
    assert router == ["python", *router_argv(workers, port=30000, host="0.0.0.0")[1:]]
    assert router[:3] == ["python", "-m", ROUTER_MODULE]


def test_kubernetes_replicas_have_probes_and_the_router_discovers_them() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d
            for name in ("k8s/redis.yaml", "k8s/replicas.yaml", "k8s/router.yaml")
            for d in documents(name)}
    replica = docs[("Deployment", "lmserve-replica")]["spec"]["template"]
    (container,) = replica["spec"]["containers"]
    assert container["args"] == serve_command(container["args"], "0.0.0.0",
                                               "redis://lmserve-redis:6379/0")
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    label = replica["metadata"]["labels"]["app"]
    (router,) = docs[("Deployment", "lmserve-router")]["spec"]["template"]["spec"]["containers"]
    args = router["args"]
    assert args[:3] == ["python", "-m", ROUTER_MODULE] and "--service-discovery" in args
    assert args[args.index("--selector") + 1] == f"app={label}"
    assert args[args.index("--service-discovery-port") + 1] == "8000"
    assert args[-len(DEFAULT_ROUTER_ARGS):] == list(DEFAULT_ROUTER_ARGS)
    role = docs[("Role", "lmserve-router")]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"])
    assert docs[("Service", "lmserve-redis")]["spec"]["ports"][0]["port"] == 6379


def test_nginx_conf_is_balanced_and_proxies_only_to_its_upstreams() -> None:
    text = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    body = re.sub(r"#[^\n]*", "", text)
    assert body.count("{") == body.count("}")
    upstreams = set(re.findall(r"upstream\s+(\S+)\s*\{", body))
    targets = set(re.findall(r"proxy_pass\s+http://([^;/\s]+)", body))
    assert upstreams == {"router", "replicas"} and targets == upstreams
    routed = set(re.findall(r"location\s*=\s*(\S+)\s*\{\s*proxy_pass\s+http://router;", body))
    assert routed == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate"}
    assert "proxy_buffering off" in body  # SSE and NDJSON streams


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if nginx is None:
        pytest.skip("nginx is not installed; the config's structure is checked above")
    # The upstream host names resolve only inside compose: map them to loopback.
    text = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    for host in ("router", "replica-1", "replica-2"):
        text = text.replace(f"server {host}:", "server 127.0.0.1:")
    conf = tmp_path / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    r = subprocess.run([nginx, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
