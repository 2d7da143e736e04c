"""Configuration layering and model references (paths, bundled names, hf:// offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmserve import config
from lmserve.core.errors import LmserveError
from lmserve.models.resolve import resolve


def test_layers_later_wins_and_aliases(tmp_path):
    f = tmp_path / "lmserve.json"
    f.write_text(json.dumps({"server": {"host": "0.0.0.0", "port": 9000},
                             "model": {"path": "/m/x.gguf", "alias": "x", "n_ctx": 2048,
                                       "n_seq_max": 4, "n_threads": 3}}))
    cfg = config.build(config.load_file(str(f)), config.from_env({"LMSERVE_PORT": "9100"}),
                       {"parallel": 6, "n_ctx": None})
    assert cfg.host == "0.0.0.0" and cfg.port == 9100
    assert cfg.models == ("x=/m/x.gguf",)
    assert cfg.engine.n_ctx == 2048 and cfg.engine.parallel == 6 and cfg.engine.threads == 3


def test_toml_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('models = ["smollm2"]\nparallel = 2\n[server]\nport = 8123\n')
    cfg = config.build(config.load_file(str(f)))
    assert cfg.port == 8123 and cfg.engine.parallel == 2 and cfg.models == ("smollm2",)
    with pytest.raises(ValueError, match="unknown configuration key"):
        config.build({"bogus": 1})
    with pytest.raises(ValueError, match="parallel must be"):
        config.build({"parallel": 0})
    with pytest.raises(ValueError, match="port must be int"):
        config.build({"port": "eighty"})


def test_speculation_and_kv_layout_settings(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("lookup = 6\nlookup_budget = 12\nkv_split = true\n")
    cfg = config.build(config.load_file(str(f)))
    assert cfg.engine.lookup == 6 and cfg.engine.lookup_budget == 12
    assert cfg.engine.kv_layout == "split"  # kv_split = true is kv_layout = "split"
    env = config.from_env({"LMSERVE_KV_SPLIT": "false", "LMSERVE_LOOKUP": "8"})
    cfg = config.build(config.load_file(str(f)), env)
    assert cfg.engine.kv_layout == "shared" and cfg.engine.lookup == 8
    env = config.from_env({"LMSERVE_KV_LAYOUT": "shared"})
    assert config.build(config.load_file(str(f)), env).engine.kv_layout == "shared"
    assert config.build({}).engine.kv_layout == "auto" and config.build({}).engine.lookup == 0
    assert config.build({"kv_layout": "split", "kv_split": None}).engine.kv_layout == "split"
    with pytest.raises(ValueError, match="kv_split"):
        config.build({"kv_split": "sometimes"})
    with pytest.raises(ValueError, match="kv_layout must be one of auto, split, shared"):
        config.build({"kv_layout": "sometimes"})


def test_env_keys_and_template_file(tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = config.build(config.from_env({"LMSERVE_API_KEY": "a, b", "LMSERVE_MODELS": "p.gguf",
                                        "LMSERVE_CHAT_TEMPLATE": str(tpl)}))
    assert cfg.api_keys == ("a", "b") and cfg.models == ("p.gguf",)
    assert cfg.engine.chat_template == tpl.read_text()


def test_resolve_paths_and_names(tmp_path):
    gguf = tmp_path / "My-Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)).name == "my-model.q4"
    assert resolve(f"assistant={gguf}").name == "assistant"
    assert resolve(str(tmp_path)).path == str(gguf.resolve())
    smol = resolve("smollm2")
    assert smol.source == "bundled" and smol.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(LmserveError) as exc:
        resolve("no-such-model")
    assert exc.value.kind.value == "model_not_found"
    with pytest.raises(LmserveError):
        resolve("hf://owner/only-two")


def test_huggingface_reference_offline_from_cache(tmp_path):
    """hf:// goes through huggingface_hub for real; offline it must find the cached file."""
    repo = tmp_path / "hub" / "models--someone--tiny-gguf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "sub"
    snap.mkdir(parents=True)
    (snap / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    code = ("from lmserve.models.resolve import resolve;"
            "r = resolve('hf://someone/tiny-gguf/sub/tiny.Q8_0.gguf'); print(r.name, r.path)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    name, path = out.stdout.split()
    assert name == "tiny.q8_0" and path.endswith("sub/tiny.Q8_0.gguf")
    missing = subprocess.run([sys.executable, "-c", code.replace("tiny.Q8_0", "other")], env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "could not fetch" in missing.stderr
