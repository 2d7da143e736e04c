"""Synthetic prompts of an approximate token length, built without a tokenizer.

Approximation: prompts are space-separated words drawn from WORDS, short and common
English words that typical BPE vocabularies (Llama, Qwen, GPT, Mistral, ...) encode as a
single token each when preceded by a space. So `input_len` words is about `input_len`
tokens; the prompt's tag ("Request 17:") takes a few more. Servers that report
`usage.prompt_tokens` give the exact count, which the results record.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lmserve.bench.base import BenchRequest

WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is it you that he was for on are with as his they be at one have
    this from or had by word but what some we can out other were all there when up use
    your how said an each she which do their time if will way about many then them write
    would like so these her long make thing see him two has look more day could go come
    did number sound no most people my over know water than call first who may down side
    been now find any new work part take get place made live where after back little only
    round man year came show every good me give our under name very through just form
    sentence great think say help low line differ turn cause much mean before move right
    boy old too same tell does set three want air well also play small end put home read
    hand port large spell add even land here must big high such follow act why ask men
    change went light kind off need house picture try us again animal point mother world
    near build self earth father head stand own page should country found answer school
    grow study still learn plant cover food sun four between state keep eye never last
    let thought city tree cross farm hard start might story saw far sea draw left late
    run while press close night real life few north open seem together next white children
    begin got walk example ease paper group always music those both mark often letter
    until mile river car feet care second book carry took science eat room friend began
    idea fish mountain stop once base hear horse cut sure watch color face wood main
    """.split()
)


def make_prompts(
    n: int,
    input_len: int,
    tokenizer_words: Sequence[str] | None = None,
    unique_prefix: bool = True,
    shared_prefix_len: int = 0,
    seed: int = 0,
    max_tokens: int = 128,
    ignore_eos: bool = True,
    first_index: int = 0,
) -> list[BenchRequest]:
    """Build `n` prompts of about `input_len` tokens (see the module docstring).

    - shared_prefix_len > 0: every prompt starts with the same `shared_prefix_len` random
      words, followed by a unique tail "Request i: ..." filling up to `input_len` words.
    - otherwise, unique_prefix: each prompt starts with "Request i:" then random words, so
      no two prompts share a cacheable prefix longer than a few tokens.
    - otherwise: random words only.

    `tokenizer_words` overrides the word list; `first_index` offsets the numbering "i" so
    that several batches (e.g. one per concurrency level) never repeat a prompt.
    """
    if n < 0 or input_len < 0 or shared_prefix_len < 0:
        raise ValueError("n, input_len and shared_prefix_len must be >= 0")
    words = tuple(tokenizer_words) if tokenizer_words is not None else WORDS
    if not words:
        raise ValueError("empty word list")
    rng = random.Random(seed)
    shared = [rng.choice(words) for _ in range(shared_prefix_len)]
    out: list[BenchRequest] = []
    for i in range(first_index, first_index + n):
        if shared_prefix_len > 0 or unique_prefix:
            tag = ["Request", f"{i}:"]
        else:
            tag = []
        fill = max(0, input_len - len(shared) - len(tag))
        body = [rng.choice(words) for _ in range(fill)]
        prompt = " ".join(shared + tag + body)
        out.append(BenchRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=ignore_eos))
    return out
