"""The Responses API's reasoning items, reasoning controls and output_text logprobs with the
official openai client, against the real server and SmolLM2.

Reasoning: SmolLM2 served with a synthetic ChatML template that opens a <think> block at the
start of every reply (unless thinking is turned off) and renders the reasoning of earlier
turns, so reasoning items given back as input reach the prompt. SmolLM2 never learnt to close
the block, so its replies stay in the reasoning unless earlier turns show it how."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.model.conftest import Server, start_with_template, stop_server
from tests.model.test_reasoning_model import no_tags

# test_output_text_logprobs (the shared `client`) runs against the local model and an
# upstream-backed one (upstream_fixtures); the reasoning tests use a server of their own.
pytestmark = pytest.mark.upstream_variant

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}")
ASK = "Why is the sky blue?"
KW: dict[str, Any] = dict(model="smollm2", max_output_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def think_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_with_template(str(tmp_path_factory.mktemp("rthink")), TEMPLATE)
    yield server
    stop_server(server)


@pytest.fixture()
def thinker(think_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=think_server.base_url, api_key="x", max_retries=0,
                       timeout=120) as client:
        yield client


def test_reasoning_item_usage_and_retrieval(thinker):
    r = thinker.responses.create(input=ASK, reasoning={"effort": "high", "summary": "auto"},
                                 **KW)
    item = r.output[0]
    assert item.type == "reasoning" and item.id.startswith("rs_") and item.summary == []
    text = item.content[0].text
    assert item.content[0].type == "reasoning_text" and text.strip() and no_tags(text)
    assert r.status == "incomplete" and item.status == "incomplete"  # never left the block
    assert r.output_text == "" and r.reasoning.effort == "high" and r.reasoning.summary == "auto"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens <= r.usage.output_tokens
    assert thinker.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_streamed_reasoning_matches_the_whole_response(thinker):
    whole = thinker.responses.create(input=ASK, **KW)
    events = list(thinker.responses.create(input=ASK, stream=True, **KW))
    kinds = [e.type for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"]
    assert kinds[-4:] == ["response.reasoning_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert deltas == done.text == whole.output[0].content[0].text
    final = events[-1].response
    assert final.output[0].content[0].text == deltas
    assert final.usage.output_tokens_details.reasoning_tokens == \
        whole.usage.output_tokens_details.reasoning_tokens


def test_effort_none_turns_thinking_off(thinker):
    r = thinker.responses.create(input=ASK, reasoning={"effort": "none"}, **KW)
    assert [item.type for item in r.output] == ["message"] and r.output_text.strip()
    assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_reasoning_items_given_back_reach_the_template(thinker):
    """Earlier turns show the model how a reply closes its reasoning; then it follows suit."""
    shots = [("What color is grass?", "Grass has chlorophyll.", "Green."),
             ("What color is snow?", "Snow reflects all light.", "White."),
             ("What color is coal?", "Coal absorbs light.", "Black.")]
    items: list[dict[str, Any]] = []
    for question, thought, answer in shots:
        items += [{"role": "user", "content": question},
                  {"type": "reasoning", "summary": [],
                   "content": [{"type": "reasoning_text", "text": thought}]},
                  {"role": "assistant", "content": answer}]
    r = thinker.responses.create(input=[*items, {"role": "user", "content": "What color is "
                                                 "the sky?"}], **{**KW, "max_output_tokens": 40})
    kinds = [item.type for item in r.output]
    assert kinds[0] == "reasoning" and no_tags(r.output[0].content[0].text)
    assert kinds == ["reasoning", "message"] and r.output_text.strip(), r.output
    assert no_tags(r.output_text)
    listed = thinker.responses.input_items.list(r.id, order="asc")
    assert [i.type for i in listed.data][:3] == ["message", "reasoning", "message"]


def test_output_text_logprobs(client):
    kw = dict(input="Name three colors.", include=["message.output_text.logprobs"],
              top_logprobs=3, **KW)
    r = client.responses.create(**kw)
    part = r.output[0].content[0]
    assert r.top_logprobs == 3 and part.logprobs
    for entry in part.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
    shown = b"".join(bytes(e.bytes) for e in part.logprobs).decode("utf-8", "replace")
    assert shown.startswith(part.text)
    events = list(client.responses.create(stream=True, **kw))
    streamed = [lp for e in events if e.type == "response.output_text.delta"
                for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [e.token for e in part.logprobs]
    assert events[-1].response.output[0].content[0].logprobs == part.logprobs
    plain = client.responses.create(input="Name three colors.", **KW)
    assert plain.output[0].content[0].logprobs == []
