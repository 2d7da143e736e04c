"""The disk cache of sequence states, with a fake memory whose state is its token list."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import pytest

from lmserve import config
from lmserve.cli import build_parser
from lmserve.core.backend import EngineStats
from lmserve.engine import disk_cache, state_file
from lmserve.engine.disk_cache import ByteSize, DiskCache
from lmserve.engine.state_file import SUFFIX
from lmserve.http.metrics import _disk_cache_families
from tests.unit.disk_fakes import MIN, StateRunner, files, harness, open_cache, save
from tests.unit.fakes import reference_output
from tests.unit.engine.test_scheduler import Harness, prompt


@pytest.fixture()
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "states")


def restarted_after_saving(cache_dir: str, model: str, tokens: list[int], **kw: object
                           ) -> tuple[Harness, StateRunner, DiskCache]:
    """Run `tokens` through one engine (its state is saved), then start a fresh one on the
    same directory, as after a restart."""
    h1, _, cache1 = harness(cache_dir, model)
    h1.submit(tokens, max_tokens=4)
    h1.run()
    cache1.close()
    return harness(cache_dir, model, **kw)


def block_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """State file reads wait until the returned event is set (a cold disk, as slow as the
    test says); the list collects the names of the threads that read."""
    released, readers = threading.Event(), []
    read_state = state_file.read_state

    def slow_read(path: str):
        readers.append(threading.current_thread().name)
        assert released.wait(10)
        return read_state(path)

    monkeypatch.setattr(disk_cache, "read_state", slow_read)
    return released, readers


# -- a restart, end to end through the scheduler ---------------------------------------------
def test_a_restarted_engine_loads_the_saved_prefix_and_output_matches(cache_dir, model):
    p = prompt(1, 40)
    h1, _, cache1 = harness(cache_dir, model)
    first = h1.submit(p, max_tokens=6)
    h1.run()
    cache1.close()
    assert cache1.stats.saves == 1 and len(files(cache_dir)) == 1
    assert h1.final(first).usage.cached_tokens == 0

    h2, runner2, cache2 = harness(cache_dir, model)  # a new process: empty KV, same directory
    question = p + [7, 7, 7]
    req = h2.submit(question, max_tokens=6)
    h2.run()
    assert h2.final(req).usage.cached_tokens == 40
    assert h2.tokens(req) == reference_output(question, 6)
    assert [len(tokens) for _, tokens in runner2.loads] == [45]  # prompt + 5 decoded outputs
    assert min(pos for _t, pos, _s, _l in runner2.decodes[0]) == 40  # the prefix was not computed
    assert cache2.stats.hits == 1 and cache2.stats.tokens_loaded == 40


def test_a_resident_prefix_is_preferred_to_the_disk(cache_dir, model):
    p = prompt(2, 40)
    h, runner, cache = harness(cache_dir, model)
    h.submit(p, max_tokens=4)
    h.run()
    cache.flush()
    again = h.submit(p + [3, 3], max_tokens=4)
    h.run()
    assert runner.loads == [] and h.final(again).usage.cached_tokens == 40


def test_a_refused_load_falls_back_to_computing(cache_dir, model, caplog):
    p = prompt(3, 40)
    h2, runner2, cache2 = restarted_after_saving(cache_dir, model, p, refuse=True)
    with caplog.at_level(logging.WARNING, "lmserve.disk_cache"):
        req = h2.submit(p + [5], max_tokens=6)
        h2.run()
    assert h2.final(req).usage.cached_tokens == 0
    assert h2.tokens(req) == reference_output(p + [5], 6)
    assert cache2.stats.load_failures == 1 and "llama.cpp refused" in caplog.text
    assert len(files(cache_dir)) == 1  # usually a full KV pool: the file is kept


def test_a_refused_load_into_an_evicted_slot_places_again_without_stale_reuse(cache_dir, model):
    runner = StateRunner()
    h = Harness(runner, slots=1, running=1)
    h.core.pool.disk = cache = open_cache(cache_dir, runner, model)
    d = prompt(12, 40)
    for tokens in (d, d[:9] + [5] * 31):  # the second stays resident and shares 9 tokens
        h.submit(tokens, max_tokens=3)
        h.run()
        cache.flush()
    runner.refuse = True
    question = d[:30] + [6] * 5  # the disk offers 30 tokens; the only slot must be evicted
    req = h.submit(question, max_tokens=4)
    h.run()  # the fake decode asserts positions: stale reuse of the wiped slot would fail
    assert h.final(req).usage.cached_tokens == 0 and cache.stats.load_failures == 1
    assert h.tokens(req) == reference_output(question, 4)


def test_running_sequences_keep_decoding_while_a_state_file_is_read(cache_dir, model,
                                                                     monkeypatch):
    p = prompt(13, 40)
    h2, runner2, cache2 = restarted_after_saving(cache_dir, model, p)
    released, reader = block_reads(monkeypatch)
    busy = h2.submit(prompt(14, 12), max_tokens=30)
    h2.core.step()
    waiting = h2.submit(p + [9, 9], max_tokens=5)
    for _ in range(5):  # the read is under way: the running sequence is not held up by it
        h2.core.step()
    assert len(h2.tokens(busy)) == 6 and h2.core.waiting and runner2.loads == []
    assert reader and reader[0].startswith("lmserve-disk-read")
    released.set()
    h2.run()
    assert h2.final(waiting).usage.cached_tokens == 40 and len(runner2.loads) == 1
    assert h2.tokens(waiting) == reference_output(p + [9, 9], 5)
    assert h2.tokens(busy) == reference_output(prompt(14, 12), 30)
    cache2.close()


def test_requests_behind_one_waiting_for_its_read_are_admitted(cache_dir, model, monkeypatch):
    p = prompt(15, 40)
    h2, runner2, cache2 = restarted_after_saving(cache_dir, model, p)
    released, _ = block_reads(monkeypatch)
    stored = h2.submit(p + [4, 4], max_tokens=3)  # first in the queue, its prefix on disk
    behind = [h2.submit(prompt(16 + i, 10), max_tokens=8) for i in range(2)]
    for _ in range(4):
        h2.core.step()
    # The two behind it run while the read is under way; the stored one keeps its place.
    assert [len(h2.tokens(r)) for r in behind] == [4, 4]
    assert h2.core.waiting and h2.core.waiting[0].request is stored and runner2.loads == []
    released.set()
    h2.run()
    assert h2.final(stored).usage.cached_tokens == 40
    assert h2.tokens(stored) == reference_output(p + [4, 4], 3)
    for i, r in enumerate(behind):
        assert h2.tokens(r) == reference_output(prompt(16 + i, 10), 8)
    cache2.close()


# -- lookup ----------------------------------------------------------------------------------
def test_lookup_takes_the_longest_shared_prefix_of_the_same_lora_set(cache_dir, model):
    cache = open_cache(cache_dir, StateRunner(), model)
    base = prompt(4, 40)
    save(cache, base[:20] + [1] * 10)
    save(cache, base[:30] + [2] * 10)
    save(cache, base[:40], adapters=(("/lora/a.gguf", 1.0),))
    hit = cache.find(base, (), limit=39, at_least=0)
    assert hit is not None and hit.usable == 30 and hit.entry.tokens == base[:30] + [2] * 10
    lora = cache.find(base, (("/lora/a.gguf", 1.0),), limit=39, at_least=0)
    assert lora is not None and lora.usable == 39  # capped: the last token is recomputed
    assert cache.find(base, (("/lora/a.gguf", 0.5),), limit=39, at_least=0) is None
    assert cache.find(base, (), limit=39, at_least=31) is None  # not better than resident
    assert cache.find(base[:7] + [9] * 30, (), limit=36, at_least=0) is None  # < min_tokens


def test_a_longer_entry_is_loaded_and_its_tail_removed(cache_dir, model):
    runner = StateRunner()
    cache = open_cache(cache_dir, runner, model)
    stored = prompt(5, 50)
    save(cache, stored)
    query = stored[:30] + [4, 4, 4]
    hit = cache.find(query, (), limit=len(query) - 1, at_least=0)
    assert hit is not None and cache.restore(hit, 3) == 30
    assert runner.kv[3] == stored[:30]


def test_offers_that_add_less_than_min_tokens_are_not_saved(cache_dir, model):
    cache = open_cache(cache_dir, StateRunner(), model)
    base = prompt(6, 60)
    save(cache, base[:5])  # shorter than min_tokens
    assert files(cache_dir) == []
    save(cache, base[:30])
    save(cache, base[:30 + MIN - 1])  # adds too little
    assert cache.stats.saves == 1
    save(cache, base[:60])  # supersedes the first: its tokens are a prefix of these
    assert cache.stats.saves == 2 and cache.stats.entries == 1
    hit = cache.find(base[:31], (), limit=30, at_least=0)
    assert hit is not None and len(hit.entry.tokens) == 60


# -- LRU under max_bytes ---------------------------------------------------------------------
def test_least_recently_used_states_are_evicted_under_max_bytes(cache_dir, model):
    runner = StateRunner(pad=10_000)
    probe = open_cache(cache_dir + "-probe", runner, model)
    save(probe, prompt(0, 20))
    size = probe.stats.bytes
    cache = open_cache(cache_dir, runner, model, max_bytes=2 * size + size // 2)
    a, b, c, d = (prompt(i, 20) for i in (10, 11, 12, 13))
    save(cache, a)
    save(cache, b)
    save(cache, c)  # evicts a
    assert cache.find(a, (), limit=19, at_least=0) is None
    hit = cache.find(b, (), limit=19, at_least=0)
    assert hit is not None and cache.restore(hit, 1) == 19  # b is now the most recent
    save(cache, d)  # evicts c, not b
    assert cache.find(c, (), limit=19, at_least=0) is None
    assert cache.find(b, (), limit=19, at_least=0) is not None
    assert cache.stats.bytes <= cache.max_bytes and len(files(cache_dir)) == 2


def test_a_smaller_max_bytes_at_start_up_evicts_the_oldest(cache_dir, model):
    runner = StateRunner(pad=10_000)
    cache = open_cache(cache_dir, runner, model)
    for i in range(3):
        save(cache, prompt(20 + i, 20))
    cache.close()
    size = cache.stats.bytes // 3
    again = open_cache(cache_dir, runner, model, max_bytes=size)
    assert again.stats.entries == 1 and again.find(prompt(22, 20), (), limit=19, at_least=0)


# -- files: atomic writes, corruption, compatibility, start-up -------------------------------
def test_a_failed_write_leaves_no_partial_file(cache_dir, model, monkeypatch, caplog):
    cache = open_cache(cache_dir, StateRunner(), model)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_file.os, "fsync", disk_full)
    with caplog.at_level(logging.WARNING, "lmserve.disk_cache"):
        save(cache, prompt(7, 30))
    assert files(cache_dir) == [] and cache.stats.entries == 0
    assert "No space left" in caplog.text
    monkeypatch.undo()
    save(cache, prompt(7, 30))  # the writer survived
    assert len(files(cache_dir)) == 1 and files(cache_dir)[0].endswith(SUFFIX)


def test_corrupt_files_are_removed_with_a_warning(cache_dir, model, caplog):
    runner = StateRunner()
    cache = open_cache(cache_dir, runner, model)
    save(cache, prompt(8, 30))
    save(cache, prompt(9, 30))
    cache.close()
    truncated, flipped = (os.path.join(cache_dir, f) for f in files(cache_dir))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 10)
    with open(flipped, "r+b") as f:  # the header stays valid; the blob checksum does not
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    Path(cache_dir, "junk" + SUFFIX).write_bytes(b"not a state at all")
    with caplog.at_level(logging.WARNING, "lmserve.disk_cache"):
        again = open_cache(cache_dir, runner, model)
        assert again.stats.entries == 1
        (survivor,) = again._entries.values()
        hit = again.find(survivor.tokens, (), limit=29, at_least=0)
        assert hit is not None and again.restore(hit, 2) == 0
    assert caplog.text.count("is corrupt") == 2 and "checksum mismatch" in caplog.text
    assert files(cache_dir) == [] and runner.kv.get(2, []) == []


def test_files_for_another_model_or_build_are_ignored_and_kept(cache_dir, model, caplog):
    cache = open_cache(cache_dir, StateRunner(), model)
    save(cache, prompt(10, 30))
    cache.close()
    with caplog.at_level(logging.WARNING, "lmserve.disk_cache"):
        other_build = open_cache(cache_dir, StateRunner(fmt="fake-2"), model)
        os.utime(model, ns=(1, 1))  # the model file changed
        other_file = open_cache(cache_dir, StateRunner(), model)
    assert other_build.stats.entries == 0 and other_file.stats.entries == 0
    assert caplog.text.count("another model file") == 2
    assert len(files(cache_dir)) == 1


def test_start_up_indexes_headers_without_reading_states(cache_dir, model, monkeypatch):
    cache = open_cache(cache_dir, StateRunner(pad=100_000), model)
    stored = [prompt(i, 20 + i) for i in range(3)]
    for tokens in stored:
        save(cache, tokens)
    cache.close()
    stale = Path(cache_dir, f".x{SUFFIX}.123.tmp")
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    fresh = Path(cache_dir, f".y{SUFFIX}.456.tmp")
    fresh.write_bytes(b"being written")

    def no_blob_reads(path: str) -> None:
        raise AssertionError("indexing read a state blob")

    monkeypatch.setattr("lmserve.engine.disk_cache.read_state", no_blob_reads)
    again = open_cache(cache_dir, StateRunner(), model)
    assert again.stats.entries == 3
    assert sorted(e.tokens for e in again._entries.values()) == sorted(stored)
    assert not stale.exists() and fresh.exists()


# -- configuration and metrics ---------------------------------------------------------------
def test_sizes_parse_with_binary_units():
    assert ByteSize("500M") == 500 << 20 and ByteSize("2G") == 2 << 30
    assert ByteSize("1.5GiB") == 3 << 29 and ByteSize("64k") == 65536 and ByteSize(10) == 10
    with pytest.raises(ValueError):
        ByteSize("2 gallons")


def test_flags_env_and_file_keys_reach_engine_settings(tmp_path):
    args = build_parser().parse_args(["serve", "--disk-cache", str(tmp_path),
                                      "--disk-cache-max-bytes", "2G",
                                      "--disk-cache-min-tokens", "128"])
    flags = {k: v for k, v in vars(args).items() if k.startswith("disk_cache")}
    engine = config.build(flags).engine
    assert (engine.disk_cache_dir, engine.disk_cache_max_bytes,
            engine.disk_cache_min_tokens) == (str(tmp_path), 2 << 30, 128)
    env = config.from_env({"LMSERVE_DISK_CACHE_MAX_BYTES": "500M"})
    assert config.build(env).engine.disk_cache_max_bytes == 500 << 20
    assert config.build({}).engine.disk_cache_dir is None  # off by default
    with pytest.raises(ValueError, match="disk_cache_min_tokens"):
        config.build({"disk_cache_min_tokens": 0})


def test_metrics_report_models_with_a_disk_cache(cache_dir, model):
    cache = open_cache(cache_dir, StateRunner(), model)
    save(cache, prompt(11, 30))

    class Service:  # a backend's stats as ModelService reports them
        def __init__(self, name: str, disk: DiskCache | None) -> None:
            self.name = name
            self.disk = disk

        def stats(self) -> EngineStats:
            return EngineStats(disk_cache=dataclasses.asdict(self.disk.stats)
                               if self.disk is not None else None)

    families = {f.name: f for f in _disk_cache_families([Service("a", cache),
                                                          Service("b", None)])}  # type: ignore
    saves = families["lmserve_disk_cache_saves"].samples
    assert [(s.labels["model"], s.value) for s in saves if s.name.endswith("_total")] == [("a", 1)]
    assert families["lmserve_disk_cache_bytes"].samples[0].value == cache.stats.bytes
