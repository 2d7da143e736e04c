"""Images in the engine core (fake runner): each image is decoded whole in a call of its own,
at most one per step, text chunks stop before it, reused KV never ends inside one."""

from __future__ import annotations

from lmserve.core.images import MediaSpan
from lmserve.engine import media
from tests.unit.fakes import FakeRunner
from tests.unit.engine.test_scheduler import Harness, prompt


def with_image(key: str, before: int, n_image: int, after: int, seed: int = 1
               ) -> tuple[list[int], tuple[MediaSpan, ...]]:
    text = prompt(seed, before + after)
    stand_in = [-1 - (hash(key) + i) % 1000 for i in range(n_image)]
    span = MediaSpan(before, n_image, key, chunk=None)
    return text[:before] + stand_in + text[before:], (span,)


def test_an_image_is_decoded_whole_in_its_own_call_and_counts_as_prompt():
    runner = FakeRunner()
    h = Harness(runner, budget=8)
    tokens, spans = with_image("a", before=5, n_image=12, after=6)
    req = h.submit(tokens, max_tokens=3, media=spans)
    h.run()
    assert runner.media_decodes == [(0, "a", 1)]  # after the first text chunk (5 tokens)
    text_rows = [pos for step in runner.decodes for _t, pos, _s, _l in step]
    assert not set(text_rows) & set(range(5, 17))  # no image position went through a batch
    final = h.final(req)
    assert final.usage.prompt_tokens == 23 and final.usage.completion_tokens == 3
    assert h.core.stats.media_chunks == 1 and h.core.stats.media_tokens == 12


def test_one_image_per_step_while_others_decode():
    runner = FakeRunner()
    h = Harness(runner, budget=64)
    plain = h.submit(prompt(3, 4), max_tokens=12)
    h.core.step()  # the plain request is decoding from here on
    tokens_a, spans_a = with_image("a", 2, 10, 3, seed=2)
    tokens_b, spans_b = with_image("b", 2, 10, 3, seed=4)
    h.submit(tokens_a, max_tokens=2, media=spans_a)
    h.submit(tokens_b, max_tokens=2, media=spans_b)
    h.run()
    steps = [at for _seq, _key, at in runner.media_decodes]
    assert len(steps) == 2 and steps[0] != steps[1]  # never two images in one step
    assert h.final(plain).finish_reason == "length"


def test_same_image_hits_the_cache_and_the_prefix():
    runner = FakeRunner()
    h = Harness(runner, budget=64)
    tokens, spans = with_image("same", 4, 10, 5)
    first = h.submit(tokens, max_tokens=2, media=spans)
    h.run()
    second = h.submit(tokens + [7, 8], max_tokens=2, media=spans)
    h.run()
    assert h.final(second).usage.cached_tokens >= 19  # image included
    assert len(runner.media_decodes) == 1  # the prefix held it: not decoded again
    assert h.final(first).usage.prompt_tokens == 19


def test_reused_prefix_is_cut_back_to_an_image_start():
    spans = (MediaSpan(4, 10, "k", None),)
    assert media.whole(spans, 9) == 4
    assert media.whole(spans, 14) == 14 and media.whole(spans, 4) == 4
    assert media.text_room(spans, 0, 100) == 4 and media.text_room(spans, 14, 3) == 3
    assert media.span_at(spans, 4) is spans[0] and media.span_at(spans, 5) is None
