"""Seed 003's `mtmd` table through a real server: a `[models.NAME]` section whose projector is
`mmproj_from_pretrained` (the random test projector in an offline Hugging Face cache in a tmp
dir: nothing reaches the hub) and whose `allowed_media_domains` names one host. The model
gets that projector (its card says vision, an image from the allowed host is read) and a URL
on another host is refused before anything is fetched."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.media_server import Answer, MediaHost, media_host
from tests.model.conftest import Server, start_server, stop_server
from tests.model.test_vision import IMAGE_TOKENS, ROOT, png
from tests.unit.test_config_mtmd import hub_cache

NAME = "seeing"
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def host() -> Iterator[MediaHost]:
    with media_host({"/a.png": Answer(png(1))}) as h:
        yield h


@pytest.fixture(scope="module")
def seeing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("mtmd-config")
    projector = tmp / "mmproj-smollm2-test.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_mmproj.py"),
                    str(projector)], check=True, capture_output=True)
    cache = hub_cache(tmp / "hub", {"lmserve-test/smollm2-mmproj/mmproj-smollm2-test.gguf":
                                    projector.read_bytes()})
    config = tmp / "lmserve.toml"
    config.write_text(f"""
[models.{NAME}]
model = "smollm2"
ctx = 1024
parallel = 2
threads = 2

[models.{NAME}.mtmd]
mmproj_from_pretrained = {{repo_id = "lmserve-test/smollm2-mmproj", filename = "{projector.name}"}}
allowed_media_domains = ["127.0.0.1"]
image_max_bytes = 20000
""")
    with pytest.MonkeyPatch.context() as env:  # the server inherits the offline cache
        env.setenv("HF_HUB_CACHE", str(cache))
        env.setenv("HF_HUB_OFFLINE", "1")
        server = start_server(str(tmp), "--config", str(config))
    yield server
    stop_server(server)


def chat(server: Server, url: str | None) -> httpx.Response:
    content: list[dict[str, Any]] = [{"type": "text", "text": QUESTION}]
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return httpx.post(f"{server.base_url}/chat/completions", timeout=300, json={
        "model": NAME, "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "user", "content": content}]})


def test_the_section_gets_its_projector_from_the_hf_cache(seeing: Server, host: MediaHost):
    models = httpx.get(f"{seeing.base_url}/models").json()["data"]
    assert next(m for m in models if m["id"] == NAME)["meta"]["vision"] is True
    with open(seeing.log_path, encoding="utf-8") as log:  # loaded from the cache's snapshot
        assert "models--lmserve-test--smollm2-mmproj" in log.read()
    text_only = chat(seeing, None)
    answer = chat(seeing, host.url("/a.png"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == \
        text_only.json()["usage"]["prompt_tokens"] + IMAGE_TOKENS
    assert host.hits["/a.png"] == 1


def test_a_host_off_the_sections_list_is_refused(seeing: Server, host: MediaHost):
    hits = dict(host.hits)
    refused = chat(seeing, host.url("/a.png", host="localhost"))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "url_not_allowed" and "'localhost'" in error["message"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert host.hits == hits  # nothing fetched
