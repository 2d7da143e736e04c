"""The model library without a model: discovery in a models directory, a Hugging Face hub
cache and an Ollama store laid out as those tools lay them out (tiny GGUFs written with the
gguf package), names, listing errors, and the library settings refused by name at start."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from lmserve.core.errors import LmserveError
from lmserve.core.lifecycle import keep_alive_seconds
from lmserve.models.library import (
    LibraryEntry,
    library_settings,
    scan_dir,
    scan_hf_cache,
    scan_ollama,
    unique_names,
)


def tiny_gguf(path: Path, *, arch: str = "llama", extra: dict[str, int] | None = None) -> Path:
    """A GGUF with one small tensor: enough for a header-only listing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def by_name(entries: list[LibraryEntry]) -> dict[str, LibraryEntry]:
    return {e.name: e for e in entries}


def test_models_dir_lists_models_shards_and_failures(tmp_path: Path) -> None:
    lib = tmp_path / "models"
    alpha = tiny_gguf(lib / "alpha.gguf")
    tiny_gguf(lib / "nested" / "Beta.gguf")
    os.symlink(alpha, lib / "linked.gguf")
    tiny_gguf(lib / "big-00001-of-00002.gguf", extra={"split.no": 0, "split.count": 2})
    tiny_gguf(lib / "big-00002-of-00002.gguf", extra={"split.no": 1, "split.count": 2})
    tiny_gguf(lib / "half-00002-of-00002.gguf")  # shard 1 missing
    tiny_gguf(lib / "mmproj-alpha-f16.gguf")  # a vision projector: not a model
    (lib / "corrupt.gguf").write_bytes(b"not a gguf at all")
    (lib / "trunc.gguf").write_bytes(alpha.read_bytes()[:-20])
    (lib / "README.md").write_text("not a model")
    found = by_name(scan_dir(str(lib)))
    assert set(found) == {"alpha", "beta", "linked", "big", "half", "corrupt", "trunc"}
    assert found["alpha"].error is None and found["alpha"].header is not None
    assert found["alpha"].header.context_length == 256
    assert found["beta"].path.endswith("nested/Beta.gguf")
    assert found["linked"].key == found["alpha"].key  # one file: one loaded model
    big = found["big"]
    assert big.error is None and big.path.endswith("big-00001-of-00002.gguf")
    assert len(big.files) == 2 and big.size_bytes == sum(os.path.getsize(f) for f in big.files)
    assert "shard(s) 1 of 2 missing" in (found["half"].error or "")
    assert "not a GGUF file" in (found["corrupt"].error or "")
    assert "truncated" in (found["trunc"].error or "")


def test_models_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        scan_dir(str(tmp_path / "nowhere"))


def make_hf_cache(root: Path, gguf_file: Path, repo: str = "owner/Tiny-GGUF",
                  filename: str = "Tiny-Q4_K_M.gguf") -> Path:
    """The hub cache's layout: blobs by hash, snapshots of symlinks, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    data = gguf_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "blobs" / digest).write_bytes(data)
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    os.symlink(f"../../blobs/{digest}", snapshot / filename)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot / filename


def test_hf_cache(tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "src.gguf")
    hub = tmp_path / "hub"
    make_hf_cache(hub, source)
    make_hf_cache(hub, source, repo="other/Tiny-GGUF")  # the same stem: no short name
    make_hf_cache(hub, source, repo="owner/Solo-GGUF", filename="Solo.gguf")
    entries = unique_names(scan_hf_cache(hub))
    found = by_name(entries)
    assert set(found) == {"owner/Tiny-GGUF:Tiny-Q4_K_M", "other/Tiny-GGUF:Tiny-Q4_K_M",
                          "owner/Solo-GGUF:Solo"}
    assert found["owner/Solo-GGUF:Solo"].aliases == ("solo",)
    assert found["owner/Tiny-GGUF:Tiny-Q4_K_M"].aliases == ()  # ambiguous
    assert all(e.error is None and e.source == "huggingface" for e in entries)


def make_ollama_store(root: Path, gguf_file: Path, *, namespace: str = "library",
                      model: str = "smollm2", tag: str = "135m",
                      params: dict[str, object] | None = None, system: str | None = None,
                      projector: Path | None = None) -> None:
    """Ollama's layout: manifests/HOST/NAMESPACE/MODEL/TAG naming blobs/sha256-HEX layers."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, media: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        return {"mediaType": f"application/vnd.ollama.image.{media}",
                "digest": f"sha256:{digest}", "size": len(data)}

    layers = [blob(gguf_file.read_bytes(), "model"),
              blob(b"{{ .Prompt }}", "template")]
    if params is not None:
        layers.append(blob(json.dumps(params).encode(), "params"))
    if system is not None:
        layers.append(blob(system.encode(), "system"))
    if projector is not None:
        layers.append(blob(projector.read_bytes(), "projector"))
    manifest = root / "manifests" / "registry.ollama.ai" / namespace / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": blob(b"{}", "config"), "layers": layers}))


def test_ollama_store(tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "src.gguf")
    store = tmp_path / "ollama"
    make_ollama_store(store, source, params={"temperature": 0.2, "stop": ["<|im_end|>"],
                                             "num_ctx": 1024, "mirostat": 1},
                      system="You are terse.")
    make_ollama_store(store, source, namespace="someone", model="tiny", tag="latest")
    bad = store / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    found = by_name(scan_ollama(store))
    assert set(found) == {"smollm2:135m", "someone/tiny:latest", "broken:latest"}
    smol = found["smollm2:135m"]
    assert smol.error is None and smol.header is not None
    assert dict(smol.defaults) == {"temperature": 0.2, "stop": ["<|im_end|>"]}
    assert smol.n_ctx == 1024 and smol.system == "You are terse."
    assert found["someone/tiny:latest"].aliases == ("someone/tiny",)
    assert "unreadable Ollama manifest" in (found["broken:latest"].error or "")


def test_unique_names_number_clashes() -> None:
    entries = [LibraryEntry("alpha", "/a/alpha.gguf", "dir"),
               LibraryEntry("alpha", "/b/alpha.gguf", "dir")]
    assert [e.name for e in unique_names(entries, taken={"smollm2"})] == ["alpha", "alpha-2"]
    assert unique_names([LibraryEntry("smollm2", "/x.gguf", "dir")],
                        taken={"smollm2"})[0].name == "smollm2-2"


def test_keep_alive_durations() -> None:
    assert [keep_alive_seconds(v) for v in (None, 0, "2s", "-1", "1h30m", 2.5)] == \
        [None, 0.0, 2.0, -1.0, 5400.0, 2.5]
    for bad in ("5x", True, [1]):
        with pytest.raises(LmserveError) as err:
            keep_alive_seconds(bad)  # type: ignore[arg-type]
        assert err.value.param == "keep_alive"


def test_library_settings() -> None:
    s = library_settings({"models_dir": "/m", "models_dirs": ["/n"], "discover": "hf, ollama",
                          "max_loaded": "2", "memory_budget": "8G", "keep_alive": "30s",
                          "load_timeout": 60})
    assert s.models_dirs == ("/m", "/n") and s.discover == ("hf", "ollama")
    assert (s.max_loaded, s.memory_budget, s.keep_alive, s.load_timeout) == \
        (2, 8 << 30, 30.0, 60.0)
    assert 0 < library_settings({"memory_budget": "0.5"}).memory_budget  # a fraction of RAM
