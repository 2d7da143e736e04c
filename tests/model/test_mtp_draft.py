"""MTP / NextN speculation (--draft mtp) on a tiny random GLM4-MoE model with one NextN layer,
written by scripts/make_test_mtp.py with SmolLM2's vocabulary.

Two servers run the same file, one drafting with the model's NextN layer and one plain; each
comparison starts from an empty KV on both (POST /flush_cache). Random weights make the head
guess the trunk's next token rarely, so few guesses are accepted: what is checked is that
guesses were proposed and verified and that greedy output is plain decoding's. A model without
NextN layers is refused at start with --draft mtp."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.model.conftest import Server, own_server, post_together, start_server

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Write a short poem about the sea.", "List three facts about the moon.",
           "Describe a cat in two sentences."]


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mtp") / "glm4moe-mtp-test.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_mtp.py"), str(out)],
                   check=True, capture_output=True)
    return out


def _args(model: Path) -> tuple[str, ...]:
    return (f"mtp={model}", "--parallel", "2", "--ctx", "1024", "--threads", "2",
            "--store", "memory")


@pytest.fixture(scope="module")
def mtp_server(tmp_path_factory: pytest.TempPathFactory, mtp_model: Path) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "mtp-draft", *_args(mtp_model), "--draft", "mtp")


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory, mtp_model: Path) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "mtp-plain", *_args(mtp_model))


def body(prompt: str, **extra: object) -> dict:
    return {"model": "mtp", "temperature": 0, "max_tokens": 48, "prompt": prompt, **extra}


def answer(data: dict) -> tuple[str, str, int]:
    choice = data["choices"][0]
    return choice["text"], choice["finish_reason"], data["usage"]["completion_tokens"]


def complete(server: Server, request: dict) -> tuple[str, str, int]:
    server.flush()
    reply = httpx.post(f"{server.url}/v1/completions", json=request, timeout=300)
    assert reply.status_code == 200, reply.text
    return answer(reply.json())


@pytest.mark.timeout(600)
def test_greedy_output_is_plain_decoding_and_guesses_are_verified(mtp_server, plain_server):
    drafted = mtp_server.metric("lmserve_draft_model_tokens_total")
    accepted = mtp_server.metric("lmserve_draft_model_accepted_tokens_total")
    for prompt in PROMPTS:
        assert complete(mtp_server, body(prompt)) == complete(plain_server, body(prompt))
    drafted = mtp_server.metric("lmserve_draft_model_tokens_total") - drafted
    accepted = mtp_server.metric("lmserve_draft_model_accepted_tokens_total") - accepted
    assert drafted > 0  # the head proposed guesses and the target verified them
    assert 0 <= accepted <= drafted
    assert plain_server.metric("lmserve_draft_model_tokens_total") == 0


def together(server: Server) -> list[tuple[str, str, int]]:
    return [answer(d) for d in post_together(server, "/v1/completions",
                                             [body(p) for p in PROMPTS[:2]])]


@pytest.mark.timeout(600)
def test_concurrent_greedy_output_is_plain_decoding(mtp_server, plain_server):
    drafted = mtp_server.metric("lmserve_draft_model_tokens_total")
    assert together(mtp_server) == together(plain_server)
    assert mtp_server.metric("lmserve_draft_model_tokens_total") > drafted


def test_a_model_without_nextn_layers_is_refused_at_start(tmp_path):
    srv = start_server(str(tmp_path), "smollm2", "--draft", "mtp", "--parallel", "2", "--ctx",
                       "1024", "--threads", "2", "--store", "memory", wait=False)
    try:
        code = srv.proc.wait(120)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        raise
    log = srv.log()
    assert code == 2, log
    assert "--draft mtp" in log and "carries no MTP / NextN layers" in log and "smollm2" in log
