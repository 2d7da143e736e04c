"""Configuring upstream models: the --upstream flag, [models.NAME] upstream tables, create_app."""

from __future__ import annotations

import pytest

from lmserve import cli, config
from lmserve.core.backend import LoadState
from lmserve.http.app import create_app
from lmserve.models.registry import ModelRegistry
from lmserve.upstream import UpstreamBackend


def test_flag_is_repeatable_and_makes_name_url_pairs():
    args = cli.build_parser().parse_args(
        ["serve", "--upstream", "smol=http://127.0.0.1:9000/v1",
         "--upstream", "big=https://gpu.example/v1"])
    cfg = cli.serve_config(args)
    assert cfg.upstreams == (("smol", "http://127.0.0.1:9000/v1", None, None),
                             ("big", "https://gpu.example/v1", None, None))
    assert cfg.models == ()


def test_toml_model_tables_with_upstream_and_path(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[models.local]\npath = "smollm2"\n'
                 '[models.smol]\nupstream = {url = "http://h:8000/v1", api_key = "k", '
                 'model = "SmolLM2"}\n'
                 '[models.plain]\nupstream = "http://h:8001/v1"\n')
    cfg = config.build(config.load_file(str(f)))
    assert cfg.models == ("local=smollm2",)
    assert cfg.upstreams == (("smol", "http://h:8000/v1", "k", "SmolLM2"),
                             ("plain", "http://h:8001/v1", None, None))


def test_a_json_model_list_may_hold_upstreams(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"models": ["smollm2", {"name": "up", "upstream": {"url": "http://h/v1"}}]}')
    cfg = config.build(config.load_file(str(f)))
    assert cfg.models == ("smollm2",) and cfg.upstreams == (("up", "http://h/v1", None, None),)


@pytest.mark.parametrize("layer, message", [
    ({"upstreams": ["smol"]}, "expected NAME=URL"),
    ({"upstreams": ["smol=ftp://x"]}, "http"),
    ({"upstreams": ["a=http://x/v1", "a=http://y/v1"]}, "same name"),
])
def test_bad_upstreams_are_refused(layer, message):
    with pytest.raises(ValueError, match=message):
        config.build(layer)


def test_bad_upstream_tables_are_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[models.smol]\nupstream = {url = "http://h/v1", key = "k"}\n')
    with pytest.raises(ValueError, match="unknown key"):
        config.load_file(str(f))


def test_create_app_registers_upstream_backends():
    registry = ModelRegistry()
    create_app(registry, load_on_startup=False,
               upstreams=(("smol", "http://127.0.0.1:9/v1", "k", "SmolLM2"),
                          ("other", "http://127.0.0.1:9/v1", None, None)))
    smol = registry.get("smol")
    assert isinstance(smol, UpstreamBackend) and smol.model == "SmolLM2"
    assert smol.card.kind == "upstream" and smol.card.state == LoadState.PENDING
    assert registry.get("other").card.upstream_model == "other"  # same URL, its own model
    assert len(registry) == 2
