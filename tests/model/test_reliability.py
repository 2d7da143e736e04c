"""The reliability suite at a small size (issue 17): each test runs one scenario of
benchmarks/reliability.py against its own `lmserve serve` processes and asserts its outcome.
`python -m benchmarks.reliability` runs the same scenarios at full size (docs/reliability.md).
No timing is asserted; every wait has a generous deadline."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import reliability as rel

needs_redis = pytest.mark.skipif(rel.redis_binary() is None,
                                 reason="redis-server is not installed (apt-get install "
                                        "redis-server)")


def test_a_disconnect_storm_leaves_no_sequence_and_no_memory_behind(tmp_path: Path) -> None:
    r = rel.storm(tmp_path, clients=16, warmup=4, max_tokens=12, parallel=4, margin_mib=150)
    assert r["running_after"] == 0 and r["waiting_after"] == 0, r
    assert r["rss_growth_mib"] <= r["margin_mib"], r
    assert r["5xx"] == 0, r
    assert all(s == 200 for s in r["followups"].values()), r
    assert r["ok"], r


def test_overload_gets_429s_with_retry_after_and_the_accepted_all_complete(
        tmp_path: Path) -> None:
    r = rel.overload(tmp_path, parallel=2, max_queue=1, factor=10, max_tokens=4)
    assert set(r["statuses"]) <= {"200", "429"}, r
    assert r["refused_429"] > 0 and r["429_without_retry_after"] == 0, r
    assert r["accepted"] > 0 and r["complete"] == r["accepted"], r
    assert r["hung"] == 0, r
    assert r["health_checks"] > 0 and r["health_failures"] == 0, r
    assert r["idle_after"], r


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_kill_9_loses_nothing_acknowledged_and_chains_go_on(tmp_path: Path, store: str) -> None:
    # A short Redis lease: the restarted server ends the killed one's open stream within
    # seconds instead of the default 15 (what is checked is the same).
    r = rel.kill9(tmp_path, store, chains=2, sessions=1, streams=1, kill_after=6, lease_ttl=2)
    assert r["responses"] >= 2 and r["session_turns"] >= 1 and r["streams"] >= 1, r
    assert r["lost"] == 0, r["lost_items"]
    assert r["continued"] == 2 + 1, r  # each chain and each session took another turn
    assert r["5xx"] == 0, r


@needs_redis
def test_redis_stopped_is_a_503_in_each_dialect_and_it_recovers(tmp_path: Path) -> None:
    r = rel.redis_outage(tmp_path, ops=6)  # one request of each kind in each phase, at once
    down = r["by_phase"]["down"]
    for kind in rel.STORE_DIALECTS:
        assert down[kind] == {"503": 1}, r
    for kind in rel.PLAIN_DIALECTS:
        assert down[kind] == {"200": 1}, r  # what needs no store keeps serving
    assert r["down_bad_shape"] == 0 and r["500s"] == 0, r
    assert r["recovered"] and not r["lmserve_restarted"], r
    for kind, statuses in r["by_phase"]["after"].items():
        assert set(statuses) <= {"200", "201"}, (kind, r)


def test_an_unwritable_disk_cache_is_a_warning_and_serving_goes_on(tmp_path: Path) -> None:
    r = rel.disk_cache_fault(tmp_path, "readonly", requests=2)
    assert r["warning"], r
    assert r["statuses"] == {"200": 3} and r["health"] == 200, r


def test_a_removed_model_file_keeps_the_loaded_model_serving(tmp_path: Path) -> None:
    r = rel.model_removed(tmp_path, requests=1)
    assert r["statuses"] == {"200": 5}, r
    assert r["listed"] and r["health"] == 200 and r["alive"], r


def test_a_corrupt_config_stops_the_start_naming_the_key_or_line(tmp_path: Path) -> None:
    r = rel.corrupt_config(tmp_path)
    for case in r["cases"]:
        assert case["rc"] == 2 and case["names"], case
