"""Draft-model speculation on the real model: SmolLM2 drafting for itself.

A second server runs with --draft smollm2, with the shared server's --parallel and --ctx so
that both lay out their KV the same way; each comparison starts from an empty KV on both
(POST /flush_cache), for the reasons test_lookup.py gives. A model drafting for itself guesses
nearly every token right, so nearly every guess is accepted, and the output must be the plain
server's. A draft model with another vocabulary is refused before the port is bound."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from lmserve.models.resolve import resolve
from tests.model.conftest import Server, own_server, post_together, start_server

PROMPTS = ["Write a short poem about the sea.", "List three facts about the moon.",
           "Describe a cat in two sentences.", "What is a prime number? Answer briefly."]


@pytest.fixture(scope="module")
def draft_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "draft", "smollm2", "--parallel", "4", "--ctx",
                          "4096", "--threads", "2", "--draft", "smollm2", "--store", "memory")


def body(prompt: str, **extra) -> dict:
    return {"model": "smollm2", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": prompt}], **extra}


def chat(server: Server, request: dict) -> dict:
    server.flush()
    reply = httpx.post(f"{server.base_url}/chat/completions", json=request, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def answer(reply: dict) -> tuple[str, str, int]:
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], \
        reply["usage"]["completion_tokens"]


@pytest.mark.timeout(600)  # six generations, half of them drafting, on 2 busy cores
def test_greedy_output_is_plain_decoding_and_nearly_every_guess_is_taken(draft_server,
                                                                           server):
    drafted = draft_server.metric("lmserve_draft_model_tokens_total")
    accepted = draft_server.metric("lmserve_draft_model_accepted_tokens_total")
    for prompt in PROMPTS[:3]:
        assert answer(chat(draft_server, body(prompt))) == answer(chat(server, body(prompt)))
    drafted = draft_server.metric("lmserve_draft_model_tokens_total") - drafted
    accepted = draft_server.metric("lmserve_draft_model_accepted_tokens_total") - accepted
    assert drafted > 30
    assert accepted >= 0.9 * drafted  # a model guessing for itself
    assert server.metric("lmserve_draft_model_tokens_total") == 0  # off by default
    assert draft_server.metric("lmserve_lookup_draft_tokens_total") == 0  # lookup stays off


def together(server: Server) -> list[tuple[str, str, int]]:
    return [answer(d) for d in post_together(server, "/v1/chat/completions",
                                             [body(p) for p in PROMPTS])]


@pytest.mark.timeout(600)
def test_concurrent_greedy_output_is_plain_decoding(draft_server, server):
    drafted = draft_server.metric("lmserve_draft_model_tokens_total")
    assert together(draft_server) == together(server)
    assert draft_server.metric("lmserve_draft_model_tokens_total") > drafted


def test_seeded_sampling_is_unchanged_by_drafting(draft_server, server):
    request = body(PROMPTS[0], temperature=0.8, seed=5)
    assert answer(chat(draft_server, request)) == answer(chat(server, request))


def test_a_cancelled_stream_leaves_the_drafter_consistent(draft_server, server):
    with httpx.stream("POST", f"{draft_server.base_url}/chat/completions",
                      json=body(PROMPTS[1], stream=True, max_tokens=200), timeout=300
                      ) as reply:
        for n, _line in enumerate(reply.iter_lines()):
            if n > 6:
                break  # the client leaves mid-stream: the engine cancels the sequence
    draft_server.assert_generation_stops()
    assert answer(chat(draft_server, body(PROMPTS[2]))) == answer(chat(server, body(PROMPTS[2])))


def _refused(tmp_path, draft: str) -> str:
    srv = start_server(str(tmp_path), "smollm2", "--draft", draft, "--parallel", "2", "--ctx",
                       "1024", "--threads", "2", "--store", "memory", wait=False)
    try:
        code = srv.proc.wait(120)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        raise
    log = srv.log()
    assert code == 2, log
    return log


def write_other_vocabulary(path: str) -> None:
    """A tiny GGUF whose vocabulary (SentencePiece, 329 tokens) is not SmolLM2's; its
    header is all a draft check reads."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens = ["<unk>", "<s>", "</s>", *(chr(c) for c in range(97, 123)),
              *(f"tok{i}" for i in range(300))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_draft_with_another_vocabulary_is_refused_at_start(tmp_path):
    other = os.path.join(tmp_path, "other-vocab.gguf")
    write_other_vocabulary(other)
    log = _refused(tmp_path, other)
    assert "does not share the vocabulary" in log
    assert other in log and resolve("smollm2").path in log and "smollm2" in log


@pytest.mark.gemma
def test_gemma_cannot_draft_for_smollm2(tmp_path):
    log = _refused(tmp_path, "gemma3-270m")
    assert "does not share the vocabulary" in log and "gemma-3-270m" in log


def test_an_unknown_draft_model_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmserve", "serve", "smollm2", "--draft",
                           str(tmp_path / "missing.gguf")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "draft" in proc.stderr and "missing.gguf" in proc.stderr
