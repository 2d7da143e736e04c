"""The RAM tier of saved sequence states (--cache-ram): a private tmpfs directory that a
conversation evicted from the slots comes back from, and CacheTiers over a disk tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmserve.engine.disk_cache import RAM_PREFIX, CacheTiers, DiskCache
from tests.unit.disk_fakes import MIN, StateRunner, open_cache, save
from tests.unit.fakes import reference_output
from tests.unit.engine.test_scheduler import Harness, prompt


@pytest.fixture()
def base(tmp_path: Path) -> str:
    """Stands in for /dev/shm: open_ram takes the base directory as an argument."""
    path = tmp_path / "shm"
    path.mkdir()
    return str(path)


def open_ram(runner: StateRunner, model: str, base: str, max_bytes: int = 1 << 30) -> DiskCache:
    return DiskCache.open_ram(runner, model_path=model, max_bytes=max_bytes, min_tokens=MIN,
                              base=base)


def test_an_evicted_conversation_comes_back_from_the_ram_tier(model, base):
    # One idle slot: the second conversation evicts the first, whose next turn then loads its
    # saved state instead of computing its history again, and answers as if computed.
    runner = StateRunner()
    h = Harness(runner, slots=2, running=1)
    ram = open_ram(runner, model, base)
    h.core.pool.disk = ram
    first = prompt(1, 40)
    a = h.submit(first, max_tokens=4)
    h.run()
    h.submit(prompt(2, 40), max_tokens=4)
    h.run()
    h.submit(prompt(3, 40), max_tokens=4)  # the two slots now hold 2 and 3: 1 is gone
    h.run()
    assert ram.flush()
    turn = first + h.tokens(a) + [9, 9, 9]
    again = h.submit(turn, max_tokens=4)
    h.run()
    assert h.final(again).usage.cached_tokens >= 40
    assert h.tokens(again) == reference_output(turn, 4)
    assert ram.stats.hits == 1 and ram.stats.saves >= 3
    ram.close()


def test_the_ram_tier_lives_in_its_own_directory_and_goes_with_close(model, base):
    runner = StateRunner()
    ram = open_ram(runner, model, base)
    assert os.path.dirname(ram.directory) == base
    assert os.path.basename(ram.directory).startswith(f"{RAM_PREFIX}{os.getpid()}-")
    save(ram, prompt(4, 30))
    assert ram.stats.entries == 1 and os.listdir(ram.directory)
    ram.close()
    assert not os.path.exists(ram.directory) and ram.stats.entries == 0


def test_a_crashed_process_leaves_a_directory_the_next_start_removes(model, base):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = Path(base) / f"{RAM_PREFIX}{dead}-abc"
    orphan.mkdir()
    (orphan / "state").write_bytes(b"x" * 100)
    alive = Path(base) / f"{RAM_PREFIX}{os.getppid()}-def"  # a running process's: kept
    alive.mkdir()
    other = Path(base) / "not-ours"
    other.mkdir()
    ram = open_ram(StateRunner(), model, base)
    assert not orphan.exists() and alive.exists() and other.exists()
    ram.close()


def test_without_a_writable_tmpfs_the_ram_tier_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="--cache-ram needs a writable tmpfs"):
        open_ram(StateRunner(), model, str(tmp_path / "missing"))


def test_tiers_save_to_both_and_load_the_longest_prefix_from_either(model, base, tmp_path):
    runner = StateRunner()
    ram = open_ram(runner, model, base, max_bytes=700)  # room for one state only
    disk = open_cache(str(tmp_path / "disk"), runner, model)
    tiers = CacheTiers(ram, disk)
    assert tiers.min_tokens == MIN
    short, long = prompt(5, 20), prompt(6, 60)
    for tokens in (short, long):
        runner.kv[0] = list(tokens)
        tiers.offer(0, tokens, ())
        assert tiers.flush()
        runner.kv[0] = []
    assert disk.stats.entries == 2 and ram.stats.entries == 1  # RAM let the older one go
    hit = tiers.find(short + [1], (), limit=21, at_least=MIN)
    assert hit is not None and hit.cache is disk and hit.usable == 20
    assert tiers.ready(hit, wait=5) and tiers.restore(hit, 2) == 20 and disk.stats.hits == 1
    hit = tiers.find(long + [1], (), limit=61, at_least=MIN)
    assert hit is not None and hit.cache is ram and hit.usable == 60  # a tie: RAM, no disk read
    assert tiers.ready(hit, wait=5) and tiers.restore(hit, 3) == 60
    assert runner.kv[3][:60] == long and ram.stats.hits == 1 and disk.stats.hits == 1
    assert tiers.clear() == 3 and ram.stats.entries == disk.stats.entries == 0
    tiers.close()
    assert not os.path.exists(ram.directory)
