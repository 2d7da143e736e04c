"""Logprobs through the official openai client: chat, completions with echo, streaming, n > 1."""

from __future__ import annotations

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is Paris. The capital of Italy is"


def check_sorted_alternatives(entry, k: int) -> None:
    assert len(entry.top_logprobs) == k
    values = [alt.logprob for alt in entry.top_logprobs]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert all(bytes(alt.bytes).decode("utf-8", "backslashreplace") == alt.token
               for alt in entry.top_logprobs)


def test_chat_logprobs_with_top_alternatives(client):
    r = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens  # every sampled token, the final EOS too
    for entry in content:
        assert entry.logprob <= 0
        check_sorted_alternatives(entry, 5)
        # greedy: the sampled token is the most likely one, with the same logprob
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8")
    assert joined.startswith(r.choices[0].message.content)


def test_chat_without_logprobs_has_none(client):
    r = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=4,
                                       temperature=0)
    assert r.choices[0].logprobs is None
    zero = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=4,
                                          temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in zero.choices[0].logprobs.content)


def test_chat_stream_carries_the_same_logprobs(client):
    kw = dict(model="smollm2", messages=MSG, max_tokens=12, temperature=0, logprobs=True,
              top_logprobs=2)
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(**kw, stream=True)
                if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in full]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in full], abs=1e-3)


def test_chat_n_choices_each_get_their_own_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=8, n=2,
                                       temperature=1.0, seed=7, logprobs=True, top_logprobs=1)
    assert len(r.choices) == 2
    total = 0
    for choice in r.choices:
        content = choice.logprobs.content
        total += len(content)
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 1 for e in content)
    assert total == r.usage.completion_tokens


def test_completion_logprobs_with_echo(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0,
                                  logprobs=3, echo=True)
    choice, usage = r.choices[0], r.usage
    lp = choice.logprobs
    assert len(lp.tokens) == usage.prompt_tokens + usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(value) and 3 <= len(top) <= 4
    assert choice.text.startswith(PROMPT)
    assert "".join(lp.tokens[:usage.prompt_tokens]) == PROMPT
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[usage.prompt_tokens] == len(PROMPT)
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert choice.text[offset:offset + len(token)] in (token, "")  # "" past a stop


def test_completion_logprobs_without_echo_cover_generated_tokens(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens
    assert lp.text_offset[0] == 0 and "".join(lp.tokens).startswith(r.choices[0].text)
    assert all(list(top) == [tok] for tok, top in zip(lp.tokens, lp.top_logprobs))


def test_echo_scores_token_prompts_like_evaluation_harnesses(client):
    """lm-eval's loglikelihood request: token ids, echo, logprobs=1, one new token."""
    ids = [504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 11227, 314]
    kw = dict(model="smollm2", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    a, b = first.choices[0].logprobs, again.choices[0].logprobs
    assert len(a.tokens) == len(ids) + 1 and a.token_logprobs[0] is None
    # the prompt is resident in the prefix cache the second time, yet it is scored in full
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert b.token_logprobs[1:] == pytest.approx(a.token_logprobs[1:], abs=1e-3)
    for value, top in zip(a.token_logprobs[1:], a.top_logprobs[1:]):
        assert max(top.values()) >= value  # lm-eval's is_greedy check reads exactly this


def test_completion_stream_with_echo_and_logprobs(client):
    kw = dict(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
              echo=True)
    full = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
    assert chunks[0].choices[0].text == PROMPT
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks) == full.text


def test_completion_n_choices_share_the_echoed_prompt(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, n=2,
                                  temperature=1.0, seed=3, logprobs=1, echo=True)
    n_prompt = r.usage.prompt_tokens
    a, b = (c.logprobs for c in r.choices)
    assert a.tokens[:n_prompt] == b.tokens[:n_prompt]
    assert a.token_logprobs[:n_prompt] == b.token_logprobs[:n_prompt]
    assert len(a.tokens) + len(b.tokens) == 2 * n_prompt + r.usage.completion_tokens


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "logprobs": "many"}, "logprobs"),
    ("completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "Hi", "logprobs": -1}, "logprobs"),
])
def test_bad_logprob_values_are_400_naming_the_param(server, endpoint, body, param):
    r = httpx.post(f"{server.base_url}/{endpoint}", json={"model": "smollm2", **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_bad_values_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG, logprobs=True,
                                       top_logprobs=50)
    assert exc.value.param == "top_logprobs"
