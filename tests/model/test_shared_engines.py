"""SmolLM2 under two [models.X] sections of one config file that differ only in their chat
template: one loaded engine, two names that each render with their own template."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.model.conftest import Server, start_server, stop_server

# ChatML without SmolLM2's default system prompt: a shorter prompt than the model's own.
BARE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("shared")
    settings = tmp / "lmserve.toml"
    common = 'model = "smollm2"\nctx = 1024\nparallel = 2\nthreads = 2\n'
    settings.write_text(f"[models.own]\n{common}\n"
                        f"[models.bare]\n{common}chat_template = '''{BARE}'''\n"
                        "params = { max_tokens = 2 }\n")
    srv = start_server(str(tmp), "--config", str(settings), "--data-dir", str(tmp))
    yield srv
    stop_server(srv)


def show(srv: Server, name: str) -> dict[str, Any]:
    r = httpx.post(f"{srv.url}/api/show", json={"model": name}, timeout=60)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def prompt_tokens(srv: Server, name: str) -> int:
    r = httpx.post(f"{srv.url}/v1/messages/count_tokens",
                   headers={"anthropic-version": "2023-06-01"},
                   json={"model": name, "messages": CHAT}, timeout=60)
    assert r.status_code == 200, r.text
    return int(r.json()["input_tokens"])


def test_each_name_shows_and_renders_its_own_template(shared: Server) -> None:
    own, bare = show(shared, "own"), show(shared, "bare")
    assert bare["template"] == BARE
    assert own["template"] != BARE and "<|im_start|>" in own["template"]  # the GGUF's own
    # SmolLM2's template adds its default system prompt; BARE does not.
    assert prompt_tokens(shared, "bare") < prompt_tokens(shared, "own")


def test_the_two_names_share_one_loaded_engine(shared: Server) -> None:
    engines = httpx.get(f"{shared.url}/admin/models").json()["data"]
    assert [sorted(e["names"]) for e in engines] == [["bare", "own"]]
    r = httpx.post(f"{shared.url}/v1/chat/completions", timeout=60,
                   json={"model": "bare", "messages": CHAT, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "bare" and body["usage"]["completion_tokens"] <= 2  # its defaults
    assert body["usage"]["prompt_tokens"] == prompt_tokens(shared, "bare")
    r = httpx.post(f"{shared.url}/v1/chat/completions", timeout=60,
                   json={"model": "own", "messages": CHAT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens(shared, "own")
