"""The disk tier of the projector's embedding cache (engine.media_cache.EmbeddingDisk): files
by content hash that outlive the process, bounded by max_bytes, least recently used out."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from lmserve import config
from lmserve.engine.media_cache import EmbeddingDisk, projector_namespace

N = 64  # floats per image in these tests
FILE = 128 + N * 4  # a .npy file: its header (128 bytes here) and the floats


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def embd(i: int) -> np.ndarray:
    return np.arange(N, dtype=np.float32) + i


def disk(root: Path, max_bytes: int = 10 * FILE) -> EmbeddingDisk:
    return EmbeddingDisk(str(root), "mmproj-test", max_bytes)


def stored(cache: EmbeddingDisk, *ids: int) -> None:
    for i in ids:
        cache.put(key(i), embd(i))
    cache.flush()


def test_written_embeddings_are_read_back_by_a_new_process(tmp_path: Path):
    first = disk(tmp_path)
    assert first.get(key(1), N) is None
    stored(first, 1, 2)
    assert first.stats.writes == 2 and first.stats.files == 2
    first.close()
    again = disk(tmp_path)  # a restarted server indexes the folder
    assert again.stats.files == 2 and again.stats.bytes == 2 * FILE
    got = again.get(key(1), N)
    assert got is not None and np.array_equal(got, embd(1)) and got.dtype == np.float32
    assert again.stats.hits == 1
    assert sorted(p.name for p in (tmp_path / "mmproj-test").iterdir()) == \
        sorted(f"{key(i)}.npy" for i in (1, 2))
    again.close()


def test_the_folder_stays_under_max_bytes_least_recently_used_out(tmp_path: Path):
    cache = disk(tmp_path, max_bytes=3 * FILE)
    stored(cache, 1, 2, 3)
    assert cache.get(key(1), N) is not None  # 1 is now the most recent
    stored(cache, 4)
    assert cache.stats.bytes <= 3 * FILE and cache.stats.evictions == 1
    assert cache.get(key(2), N) is None  # the least recently used went
    assert all(cache.get(key(i), N) is not None for i in (1, 3, 4))
    assert not (tmp_path / "mmproj-test" / f"{key(2)}.npy").exists()
    cache.close()


def test_recency_survives_a_restart(tmp_path: Path):
    cache = disk(tmp_path, max_bytes=3 * FILE)
    stored(cache, 1, 2, 3)
    for i, k in enumerate((key(1), key(2), key(3))):  # 1 newest on disk, then 2, then 3
        os.utime(tmp_path / "mmproj-test" / f"{k}.npy", ns=(10**18 - i, 10**18 - i))
    cache.close()
    again = disk(tmp_path, max_bytes=3 * FILE)
    stored(again, 4)
    assert again.get(key(3), N) is None and again.get(key(1), N) is not None
    again.close()


def test_a_smaller_bound_at_start_removes_the_oldest(tmp_path: Path):
    cache = disk(tmp_path)
    stored(cache, 1, 2, 3)
    cache.close()
    small = disk(tmp_path, max_bytes=FILE)
    assert small.stats.files == 1 and small.stats.bytes == FILE
    small.close()


def test_bad_files_are_misses_and_are_removed(tmp_path: Path):
    cache = disk(tmp_path)
    stored(cache, 1, 2)
    folder = tmp_path / "mmproj-test"
    (folder / f"{key(1)}.npy").write_bytes(b"not an array")
    assert cache.get(key(1), N) is None
    assert not (folder / f"{key(1)}.npy").exists()
    assert cache.get(key(2), N + 1) is None  # the wrong size for this image: removed
    assert not (folder / f"{key(2)}.npy").exists()
    assert cache.stats.files == 0 and cache.stats.bytes == 0
    cache.close()


def test_leftovers_and_foreign_files_are_not_indexed(tmp_path: Path):
    folder = tmp_path / "mmproj-test"
    folder.mkdir()
    (folder / f".{key(1)}.7.tmp").write_bytes(b"half")
    (folder / "notes.txt").write_text("mine")
    cache = disk(tmp_path)
    assert cache.stats.files == 0
    assert not (folder / f".{key(1)}.7.tmp").exists() and (folder / "notes.txt").exists()
    cache.put("../../escape", embd(1))  # not a content hash: never a file name
    cache.flush()
    assert cache.stats.writes == 0
    cache.close()


def test_each_projector_has_its_own_folder(tmp_path: Path):
    proj = tmp_path / "mmproj-a.gguf"
    proj.write_bytes(b"one")
    a = projector_namespace(str(proj), 576)
    assert a == projector_namespace(str(proj), 576)
    assert a != projector_namespace(str(proj), 960)  # another model width
    proj.write_bytes(b"other")
    os.utime(proj, ns=(1, 1))
    assert a != projector_namespace(str(proj), 576)  # the file changed


def test_seed_003_mtmd_table_sets_the_disk_tier(tmp_path: Path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"mtmd": {"mmproj_path": "/m/mmproj.gguf", "embedding_cache": '
                    '{"path": "/tmp/emb", "max_bytes": 1048576}, "image_max_bytes": 5000}}}')
    engine = config.build(config.load_file(str(path))).engine
    assert (engine.mmproj, engine.media_cache_dir, engine.media_cache_disk_bytes) == \
        ("/m/mmproj.gguf", "/tmp/emb", 1 << 20)
    assert engine.media.max_bytes == 5000
    path.write_text('{"model": {"mtmd": {"embedding_cache": {"size": 1}}}}')
    with pytest.raises(ValueError, match="embedding_cache"):
        config.load_file(str(path))
