"""A conversation's next request reuses the KV of the answer the client sends back, even where
the model wrote that answer in other tokens than its text tokenizes to (engine.turn_memory),
against the real SmolLM2: a forced tool call sent back as the client received it, and a plain
answer. The ids are the model's own, so the reused prefix covers the whole previous prompt and
answer; only the new turn is computed."""

from __future__ import annotations

import httpx
import pytest

from tests.model.conftest import Server
from tests.model.test_tools_openai import TOOLS

SYSTEM = {"role": "system", "content": "You are a careful assistant. Use the tools when asked."}


def chat(server: Server, body: dict) -> dict:
    reply = httpx.post(f"{server.base_url}/chat/completions", timeout=120,
                       json={"model": "smollm2", "temperature": 0, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("ask", ["What is the weather in Paris?", "What time is it in Tokyo?"])
def test_a_returned_tool_call_reuses_the_kv_it_came_from(server, ask):
    server.flush()
    first = [SYSTEM, {"role": "user", "content": ask}]
    forced = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    one = chat(server, {"messages": first, **forced, "max_tokens": 200, "logprobs": True})
    message = one["choices"][0]["message"]
    assert one["choices"][0]["finish_reason"] == "tool_calls" and len(message["tool_calls"]) == 1
    # the ids the model wrote the call in, up to the one that closes it
    written, n_call = b"", 0
    for entry in one["choices"][0]["logprobs"]["content"]:
        written += bytes(entry["bytes"])
        n_call += 1
        if written.rstrip().endswith(b"</tool_call>"):
            break
    else:
        raise AssertionError(f"no closed call in {written!r}")
    call = message["tool_calls"][0]
    second = [*first, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": call["id"], "content": '{"result": "sunny"}'}]
    reuses = server.metric("lmserve_turn_memory_reuses_total")
    two = chat(server, {"messages": second, **forced, "max_tokens": 8})
    assert server.metric("lmserve_turn_memory_reuses_total") == reuses + 1
    n_prompt = one["usage"]["prompt_tokens"]
    reused = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused >= n_prompt + n_call - 1, (n_prompt, n_call, reused, written)


def test_a_returned_answer_reuses_the_kv_it_came_from(server):
    server.flush()
    first = [{"role": "user", "content": "Write two short sentences about rivers."}]
    one = chat(server, {"messages": first, "max_tokens": 24})
    answer = one["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer},
              {"role": "user", "content": "Now one about lakes."}]
    two = chat(server, {"messages": second, "max_tokens": 8})
    used, reused = one["usage"], two["usage"]["prompt_tokens_details"]["cached_tokens"]
    # every answer token but the last (the end-of-turn token, or the one max_tokens cut off)
    # went into the KV
    assert reused >= used["prompt_tokens"] + used["completion_tokens"] - 1, (used, reused)
