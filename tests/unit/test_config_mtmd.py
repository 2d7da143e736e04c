"""Seed 003's `mtmd` table (global `model.mtmd` and per `[models.NAME]`): each key reaches its
setting (the projector, the embedding cache's disk tier, the media policy), unknown keys are
refused by name, and `mmproj_from_pretrained` / LoRA `from_pretrained` resolve through
huggingface_hub's cache (an offline cache in a tmp dir: nothing reaches the hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmserve import config
from lmserve.chat.media import MediaPolicy

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def load(tmp_path: Path, data: dict[str, Any]) -> config.ServerConfig:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return config.build(config.load_file(str(path)))


def sections(cfg: config.ServerConfig) -> dict[str, Any]:
    return {section.name: settings for section, settings in cfg.model_sections}


def hub_cache(root: Path, files: dict[str, bytes]) -> Path:
    """huggingface_hub's cache layout with `owner/repo/path` files at one commit of main."""
    for name, data in files.items():
        owner, repo, path = name.split("/", 2)
        folder = root / f"models--{owner}--{repo}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        target = folder / "snapshots" / COMMIT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def offline(root: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def test_the_global_table_reaches_the_projector_cache_and_policy(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    cfg = load(tmp_path, {"model": {"mtmd": {
        "mmproj_path": "/m/mmproj.gguf",
        "embedding_cache": {"path": "/tmp/emb", "max_bytes": 1 << 20},
        "image_max_bytes": 5000, "image_timeout_seconds": 2.5,
        "allowed_media_domains": ["Example.com", "static.example.com"],
        "allowed_local_media_path": str(media)}}})
    engine = cfg.engine
    assert (engine.mmproj, engine.media_cache_dir, engine.media_cache_disk_bytes) == \
        ("/m/mmproj.gguf", "/tmp/emb", 1 << 20)
    assert engine.media == MediaPolicy(max_bytes=5000, timeout=2.5,
                                       allowed_domains=("example.com", "static.example.com"),
                                       local_dir=str(media.resolve()))


def test_a_models_table_overrides_the_global_one_for_that_model(tmp_path: Path):
    cfg = load(tmp_path, {
        "model": {"mtmd": {"allowed_media_domains": ["a.org"], "image_max_bytes": 5000}},
        "models": {
            "own": {"model": "smollm2", "ctx": 512, "mtmd": {
                "allowed_media_domains": ["b.org"], "image_timeout_seconds": 3,
                "mmproj_path": "/m/own-mmproj.gguf"}},
            "plain": {"model": "smollm2", "ctx": 256},
            "listed": {"model": "smollm2", "media_max_images": 2}}})
    assert cfg.engine.media == MediaPolicy(max_bytes=5000, allowed_domains=("a.org",))
    own, plain, listed = (sections(cfg)[n] for n in ("own", "plain", "listed"))
    # what the section leaves out comes from the server's policy
    assert own.media == MediaPolicy(max_bytes=5000, allowed_domains=("b.org",), timeout=3.0)
    assert own.mmproj == "/m/own-mmproj.gguf" and plain.mmproj is None
    assert plain.media == cfg.engine.media
    assert listed.media == MediaPolicy(max_bytes=5000, allowed_domains=("a.org",),
                                       max_images=2)
    # a `models` list's entries read their mtmd table too
    cfg = load(tmp_path, {"models": [{"name": "x", "model": "smollm2",
                                      "mtmd": {"image_max_bytes": 7}}]})
    assert sections(cfg)["x"].media.max_bytes == 7


@pytest.mark.parametrize(("data", "message"), [
    ({"model": {"mtmd": {"image_size": 1}}}, "mtmd: unknown key(s) image_size"),
    ({"models": {"m": {"model": "smollm2", "mtmd": {"mmproj": "/x", "colour": 1}}}},
     "models.m.mtmd: unknown key(s) colour, mmproj"),
    ({"model": {"mtmd": ["image_max_bytes"]}}, "mtmd: expected a table"),
    ({"model": {"mtmd": {"mmproj_path": "/a.gguf", "mmproj_from_pretrained": {}}}},
     "mmproj_path and mmproj_from_pretrained"),
    ({"model": {"mtmd": {"allowed_media_domains": ["*.example.com"]}}},
     "allowed_media_domains: '*.example.com': exact host names only"),
    ({"models": {"m": {"model": "smollm2", "mtmd": {"allowed_media_domains": "x.org/a"}}}},
     "models.m: allowed_media_domains: 'x.org/a' is not a host name"),
    ({"model": {"mtmd": {"allowed_local_media_path": "/no/such/dir"}}},
     "allowed_local_media_path '/no/such/dir' is not a directory"),
    ({"model": {"mtmd": {"image_max_bytes": 0}}}, "image_max_bytes must be at least 1"),
    ({"model": {"mtmd": {"image_timeout_seconds": "soon"}}},
     "image_timeout_seconds must be float"),
    ({"model": {"mtmd": {"allowed_media_domains": 5}}}, "allowed_media_domains: expected a list"),
    ({"model": {"image_max_bytes": 10, "media_max_bytes": 20}},
     "image_max_bytes and media_max_bytes are one setting"),
])
def test_bad_tables_are_refused_by_name(tmp_path: Path, data: dict[str, Any], message: str):
    with pytest.raises(ValueError) as exc:
        load(tmp_path, data)
    assert message in str(exc.value)


def test_the_seed_names_and_lmserves_take_turns_by_layer(tmp_path: Path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"mtmd": {"allowed_media_domains": ["a.org"],
                                                   "image_max_bytes": 100}}}))
    file = config.load_file(str(path))
    # a later layer wins whichever name it uses
    cfg = config.build(file, config.from_env({"LMSERVE_MEDIA_MAX_BYTES": "300"}),
                       {"media_allowed_domains": ["*.b.org"]})
    assert cfg.engine.media == MediaPolicy(max_bytes=300, allowed_domains=("*.b.org",))
    cfg = config.build({"media_max_bytes": 5}, file)
    assert cfg.engine.media.max_bytes == 100
    env = config.from_env({"LMSERVE_ALLOWED_MEDIA_DOMAINS": "c.org,d.org",
                           "LMSERVE_ALLOWED_LOCAL_MEDIA_PATH": str(tmp_path)})
    assert config.build(file, env).engine.media == MediaPolicy(
        max_bytes=100, allowed_domains=("c.org", "d.org"), local_dir=str(tmp_path.resolve()))
    # the projector likewise: the flag's --mmproj replaces the file's mmproj_from_pretrained
    pretrained = {"mmproj_from_pretrained": {"repo_id": "o/r", "filename": "p.gguf"}}
    assert config.build(pretrained, {"mmproj": "/flag.gguf"}).engine.mmproj == "/flag.gguf"


@pytest.mark.parametrize(("value", "message"), [
    ("o/r/p.gguf", "mmproj_from_pretrained: expected a table {repo_id, filename}"),
    ({"repo_id": "o/r", "filename": "p.gguf", "file": "x"},
     "mmproj_from_pretrained: unknown key(s) file"),
    ({"repo_id": "just-a-name", "filename": "p.gguf"}, "mmproj_from_pretrained.repo_id"),
    ({"repo_id": "o/r/s", "filename": "p.gguf"}, "mmproj_from_pretrained.repo_id"),
    ({"repo_id": "o/r"}, "mmproj_from_pretrained.filename"),
    ({"repo_id": "o/r", "filename": "*-F16.gguf"}, "mmproj_from_pretrained.filename"),
    ({"repo_id": "o/r", "filename": "p.bin"}, "mmproj_from_pretrained.filename"),
    ({"repo_id": "o/r", "filename": "p.gguf", "revision": 3}, "mmproj_from_pretrained.revision"),
])
def test_a_malformed_from_pretrained_is_refused_by_name(value: Any, message: str):
    with pytest.raises(ValueError) as exc:
        config.build({"mmproj_from_pretrained": value})
    assert message in str(exc.value)
    with pytest.raises(ValueError, match=r"loras\[0\]\.from_pretrained"):
        config.build({"loras": [{"from_pretrained": value}]})


RESOLVE = """
import json, sys
from lmserve import config
cfg = config.build(config.load_file(sys.argv[1]))
print(json.dumps({"mmproj": cfg.engine.mmproj,
                  "sections": {s.name: e.mmproj for s, e in cfg.model_sections},
                  "loras": [[l.alias, l.path, l.scale] for l in cfg.engine.loras]}))
"""


def test_from_pretrained_resolves_through_the_hf_cache(tmp_path: Path):
    cache = hub_cache(tmp_path / "hub", {"vis/proj/mmproj-model-F16.gguf": b"GGUF",
                                         "vis/proj/sub/other-mmproj.gguf": b"GGUF",
                                         "ada/pters/style.gguf": b"GGUF"})
    path = tmp_path / "c.toml"
    path.write_text("""
[model.mtmd]
mmproj_from_pretrained = {repo_id = "vis/proj", filename = "mmproj-model-F16.gguf"}
[[model.loras]]
from_pretrained = {repo_id = "ada/pters", filename = "style.gguf"}
scale = 0.5
[[model.loras]]
alias = "named"
from_pretrained = {repo_id = "ada/pters", filename = "style.gguf", revision = "main"}
[models.own]
model = "smollm2"
ctx = 256
mtmd = {mmproj_from_pretrained = {repo_id = "vis/proj", filename = "sub/other-mmproj.gguf"}}
""")
    out = subprocess.run([sys.executable, "-c", RESOLVE, str(path)], env=offline(cache),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    snapshot = cache / "models--vis--proj" / "snapshots" / COMMIT
    assert got["mmproj"] == str(snapshot / "mmproj-model-F16.gguf")
    assert got["sections"] == {"own": str(snapshot / "sub" / "other-mmproj.gguf")}
    style = str(cache / "models--ada--pters" / "snapshots" / COMMIT / "style.gguf")
    # no alias: the file's name
    assert got["loras"] == [["style", style, 0.5], ["named", style, 1.0]]


def serve(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lmserve serve` that must stop at its configuration (exit 2, before any model loads)."""
    return subprocess.run([sys.executable, "-m", "lmserve", "serve", *args, "--port", "0"],
                          env=offline(cache), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_a_projector_missing_from_the_hub_stops_the_server_naming_the_key(tmp_path: Path):
    cache = hub_cache(tmp_path / "hub", {"vis/proj/mmproj-model-F16.gguf": b"GGUF"})
    path = tmp_path / "c.toml"
    path.write_text('[model.mtmd]\nmmproj_from_pretrained = '
                    '{repo_id = "vis/proj", filename = "mmproj-missing.gguf"}\n')
    out = serve(tmp_path, cache, "smollm2", "--config", str(path))
    assert out.returncode == 2
    assert "mmproj_from_pretrained: could not fetch 'hf://vis/proj/mmproj-missing.gguf'" in \
        out.stderr
    path.write_text('[model.mtmd]\nmmproj_from_pretrained = {repo_id = "vis"}\n')
    out = serve(tmp_path, cache, "smollm2", "--config", str(path))
    assert out.returncode == 2 and "mmproj_from_pretrained.repo_id" in out.stderr
    # the flag form
    out = serve(tmp_path, cache, "smollm2", "--mmproj", "hf://vis/nothing/mmproj.gguf")
    assert out.returncode == 2
    assert "mmproj: could not fetch 'hf://vis/nothing/mmproj.gguf'" in out.stderr
    path.write_text('[[model.loras]]\nfrom_pretrained = {repo_id = "ada/pters", filename = '
                    '"gone.gguf"}\n')
    out = serve(tmp_path, cache, "smollm2", "--config", str(path))
    assert out.returncode == 2 and "loras[0].from_pretrained: could not fetch" in out.stderr
