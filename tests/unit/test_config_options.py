"""Engine settings are declared once (lmserve.config.ENGINE_OPTIONS): the flags, the file keys
and the LMSERVE_* variables all come from that declaration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmserve import config
from lmserve.cli import build_parser, serve_config
from lmserve.service import EngineSettings

# Settings with a shape of their own: the adapters (--lora), the template (a file or inline
# source) and the media policy (its own keys, lmserve.chat.media).
COMPOSITE = {"loras", "chat_template", "media"}
SAMPLE = {"parallel": "3", "n_ctx": "1024", "threads": "2", "threads_batch": "2",
          "step_tokens": "256", "max_queue": "9", "max_queued_tokens": "500", "cache_slots": "2",
          "cache_tokens": "64", "session_kv_budget": "128",
          "kv_layout": "shared", "lookup": "4", "lookup_budget": "8",
          "mixed_prefill": "32", "prefill_lane": "1", "prefill_lane_min": "300",
          "prefix_wait": "16", "mmproj": "/tmp/mmproj.gguf",
          "media_cache_bytes": "1000",
          "media_cache_dir": "/tmp/mc", "media_cache_disk_bytes": "3M",
          "draft": "smollm2", "draft_max": "3",
          "context_overflow": "truncate", "disk_cache_dir": "/tmp/dc",
          "response_schema": str(Path(__file__).with_name("response_schema_think.json")),
          "disk_cache_max_bytes": "2M", "disk_cache_min_tokens": "32", "embedding_ctx": "512",
          "cache_ram_bytes": "3G", "cache_ram_min_tokens": "16",
          "gpu_layers": "12", "split_mode": "row", "main_gpu": "1", "tensor_split": "3,1",
          "flash_attn": "on", "cache_type_k": "q8_0", "cache_type_v": "q4_0",
          "rpc": "10.0.0.2:50052,gpu-box:50053",
          # switches: the flag alone sets the value a file or the environment spells out
          "kv_offload": "false", "op_offload": "false", "mlock": "true", "mmap": "false"}


def test_every_engine_setting_is_declared_once() -> None:
    fields = {f.name for f in dataclasses.fields(EngineSettings)} - COMPOSITE
    keys = [o.key for o in config.ENGINE_OPTIONS]
    assert sorted(keys) == sorted(fields) and len(set(keys)) == len(keys)
    assert set(SAMPLE) == fields


def _expected(key: str) -> object:
    option = next(o for o in config.ENGINE_OPTIONS if o.key == key)
    return option.kind(SAMPLE[key])


@pytest.mark.parametrize("option", config.ENGINE_OPTIONS, ids=lambda o: o.key)
def test_each_option_reaches_the_settings_by_flag_env_and_file(option: config.Option,
                                                                tmp_path) -> None:
    value = SAMPLE[option.key]
    flag = [option.flags[0]] if option.const is not None else [option.flags[0], value]
    args = build_parser().parse_args(["serve", *flag])
    by_flag = serve_config(args)
    by_env = config.build(config.from_env({f"LMSERVE_{option.key.upper()}": value}))
    path = tmp_path / "c.json"
    path.write_text(f'{{"model": {{"{option.key}": "{value}"}}}}')
    by_file = config.build(config.load_file(str(path)))
    for cfg in (by_flag, by_env, by_file):
        assert getattr(cfg.engine, option.key) == _expected(option.key)
    for alias in option.aliases:  # llama-cpp-python's names in files
        assert getattr(config.build({alias: value}).engine, option.key) == _expected(option.key)


@pytest.mark.parametrize("option", [o for o in config.ENGINE_OPTIONS if o.minimum or o.choices],
                         ids=lambda o: o.key)
def test_declared_limits_are_enforced(option: config.Option) -> None:
    bad = "0" if option.minimum else "nonsense"
    with pytest.raises(ValueError, match=option.key):
        config.build({option.key: bad})
