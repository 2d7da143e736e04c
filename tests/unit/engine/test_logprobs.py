"""Logprob math against a float64 numpy reference, and the engine paths that produce logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from lmserve.core.events import TokenOutput
from lmserve.core.request import SamplingParams
from lmserve.engine.logprobs import LogprobScorer, log_normalizer, top_tokens
from lmserve.engine.sequence import EngineRequest, Sequence
from tests.unit.fakes import FakeRunner, fake_logits, reference_output
from tests.unit.engine.test_scheduler import Harness, prompt


def log_softmax(row: np.ndarray) -> np.ndarray:
    wide = row.astype(np.float64)
    peak = wide.max()
    return wide - (peak + np.log(np.exp(wide - peak).sum()))


@pytest.mark.parametrize("width", [7, 50, 49_152, 262_144])
def test_log_normalizer_and_top_k_match_the_reference(width):
    rng = np.random.default_rng(width)
    row = (rng.standard_normal(width) * 4 + 30).astype(np.float32)
    expected = log_softmax(row)
    lse = log_normalizer(row, np.empty_like(row))
    assert np.allclose(row.astype(np.float64) - lse, expected, atol=1e-4)
    for k in (0, 1, 5, 20):
        top = top_tokens(row, k)
        assert top == list(np.argsort(-expected, kind="stable")[:min(k, width)])


def test_top_k_orders_ties_by_token_id_and_caps_at_the_vocabulary():
    row = np.array([1.0, 3.0, 3.0, 2.0, 3.0], dtype=np.float32)
    assert top_tokens(row, 3) == [1, 2, 4]
    assert top_tokens(row, 99) == [1, 2, 4, 3, 0]


@pytest.mark.parametrize("spread", [0.0, 1.0, 20.0, 200.0])
def test_top_k_is_exact_however_peaked_the_row(spread):
    """Rows where k tokens lie near the peak, or only one does (the search widens, then
    falls back to the whole row), or all tie."""
    rng = np.random.default_rng(int(spread))
    row = (rng.standard_normal(5000) * spread).astype(np.float32)
    row[123] = row.max() + 50.0
    for k in (2, 7, 20):
        top = top_tokens(row, k)
        assert len(set(top)) == k and top[0] == 123
        assert list(row[top]) == sorted(row, reverse=True)[:k]


def test_log_normalizer_survives_masked_entries():
    row = np.array([-np.inf, 0.0, -np.inf, 0.0], dtype=np.float32)
    assert log_normalizer(row, np.empty_like(row)) == pytest.approx(np.log(2.0))


class RowSource:
    """A LogitsSource over fixed rows, counting how often a row is read."""

    def __init__(self, rows: list[np.ndarray]):
        self.rows = rows
        self.n_vocab = rows[0].shape[0]
        self.reads = 0

    def logits_row(self, batch_index: int) -> np.ndarray:
        self.reads += 1
        return self.rows[batch_index]

    def token_bytes(self, token: int) -> bytes:
        return f"t{token}".encode()


def _sequence(logprobs: int | None) -> Sequence:
    request = EngineRequest([1, 2], sampling=SamplingParams(), max_tokens=4, logprobs=logprobs)
    return Sequence.for_request(request, 0)


def test_scorer_gives_the_sampled_token_and_sorted_alternatives():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(300).astype(np.float32)
    scorer = LogprobScorer(RowSource([row]))
    seq = _sequence(4)
    scorer.sampled(seq, 0, 17)
    entry = seq.sampled_logprob
    reference = log_softmax(row)
    assert entry.token_id == 17 and entry.piece == b"t17"
    assert entry.logprob == pytest.approx(reference[17], abs=1e-5)
    assert [t.token_id for t in entry.top] == list(np.argsort(-reference)[:4])
    assert [t.logprob for t in entry.top] == pytest.approx(sorted(reference)[::-1][:4], abs=1e-5)


def test_siblings_sampling_one_row_share_its_work_but_keep_their_own_k():
    row = np.linspace(-3, 3, 64, dtype=np.float32)
    scorer = LogprobScorer(RowSource([row]))
    first, second, narrow = _sequence(3), _sequence(3), _sequence(0)
    scorer.sampled(first, 0, 63)
    scorer.sampled(second, 0, 5)
    scorer.sampled(narrow, 0, 63)
    assert first.sampled_logprob.top == second.sampled_logprob.top
    assert len(first.sampled_logprob.top) == 3 and narrow.sampled_logprob.top == ()
    assert first.sampled_logprob.logprob == narrow.sampled_logprob.logprob


def test_prompt_chunk_bounds_the_logits_buffer():
    assert LogprobScorer(RowSource([np.zeros(262_144, np.float32)])).prompt_chunk == 64
    assert LogprobScorer(RowSource([np.zeros(49_152, np.float32)])).prompt_chunk == 341


# -- through the engine, with the fake model -----------------------------------------------------

def entries(outputs: list[TokenOutput], index: int = 0):
    return [e for o in outputs if o.index == index for e in (o.logprobs or [])]


def prompt_entries(outputs: list[TokenOutput], index: int = 0):
    firsts = [o.prompt_logprobs for o in outputs if o.index == index and o.prompt_logprobs]
    assert len(firsts) == 1, "prompt logprobs come once, on the choice's first output"
    return firsts[0]


def check_prompt_scores(scores, tokens: list[int], k: int) -> None:
    assert len(scores) == len(tokens)
    assert scores[0].token_id == tokens[0] and scores[0].logprob is None and scores[0].top == ()
    for t in range(1, len(tokens)):
        reference = log_softmax(fake_logits(tokens[t - 1], t - 1))
        assert scores[t].token_id == tokens[t]
        assert scores[t].logprob == pytest.approx(reference[tokens[t]], abs=1e-5)
        assert [a.token_id for a in scores[t].top] == list(np.argsort(-reference)[:k])


def test_greedy_tokens_are_their_rows_top_alternative():
    h = Harness(FakeRunner())
    p = prompt(1, 10)
    req = h.submit(p, max_tokens=6, logprobs=3)
    plain = h.submit(prompt(2, 10), max_tokens=6)
    h.run()
    got = entries(h.outputs[req.request_id])
    assert [e.token_id for e in got] == reference_output(p, 6)
    for e in got:
        assert e.logprob <= 0 and e.top[0].token_id == e.token_id
        assert e.top[0].logprob == e.logprob and len(e.top) == 3
        assert [a.logprob for a in e.top] == sorted((a.logprob for a in e.top), reverse=True)
    assert all(o.logprobs is None and o.prompt_logprobs is None
               for o in h.outputs[plain.request_id])


def test_sequences_that_do_not_ask_never_reach_the_scorer():
    h = Harness(FakeRunner())
    calls = []
    h.core.scorer.sampled = lambda *a: calls.append(a)  # type: ignore[method-assign]
    h.submit(prompt(3, 30), max_tokens=5, n=2)
    h.run()
    assert calls == []
    flagged = [pos for step in h.runner.decodes for _tok, pos, _seq, flag in step if flag]
    assert flagged == [29, 30, 30, 31, 31, 32, 32, 33, 33]  # the sampled rows only


def test_prompt_logprobs_over_chunked_prefill():
    h = Harness(FakeRunner(batch=16), budget=16)
    p = prompt(4, 50)
    req = h.submit(p, max_tokens=3, prompt_logprobs=2, logprobs=0)
    h.run()
    outs = h.outputs[req.request_id]
    check_prompt_scores(prompt_entries(outs), p, 2)
    assert [e.token_id for e in entries(outs)] == reference_output(p, 3)
    assert all(e.top == () for e in entries(outs))


def test_prompt_logprobs_skip_the_prefix_cache():
    h = Harness(FakeRunner())
    p = prompt(5, 40)
    h.submit(p, max_tokens=2)
    h.run()
    scored = h.submit(p, max_tokens=2, prompt_logprobs=0)
    h.run()
    assert h.final(scored).usage.cached_tokens == 0
    check_prompt_scores(prompt_entries(h.outputs[scored.request_id]), p, 0)
    again = h.submit(p, max_tokens=2)
    h.run()
    assert h.final(again).usage.cached_tokens == len(p) - 1


def test_prompt_logprobs_survive_preemption_without_duplicates():
    runner = FakeRunner(batch=8, kv_capacity=90)
    h = Harness(runner, slots=4, running=2, budget=8)
    first = h.submit(prompt(6, 20), max_tokens=30)
    p = prompt(7, 80)
    scored = h.submit(p, max_tokens=4, prompt_logprobs=1, logprobs=1)
    preempted_at = []
    preempt = h.core._preempt
    h.core._preempt = lambda seq: (preempted_at.append(seq.n_computed), preempt(seq))
    h.run()
    assert preempted_at and 0 < preempted_at[0] < len(p)  # in the middle of the prompt
    assert h.tokens(first) == reference_output(prompt(6, 20), 30)
    outs = h.outputs[scored.request_id]
    check_prompt_scores(prompt_entries(outs), p, 1)
    assert [e.token_id for e in entries(outs)] == reference_output(p, 4)


def test_n_choices_share_prompt_logprobs_and_score_their_own_tokens():
    h = Harness(FakeRunner())
    p = prompt(8, 12)
    req = h.submit(p, max_tokens=5, n=3, prompt_logprobs=0, logprobs=2)
    h.run()
    outs = h.outputs[req.request_id]
    for i in range(3):
        check_prompt_scores(prompt_entries(outs, i), p, 0)
        assert [e.token_id for e in entries(outs, i)] == h.tokens(req, i)
        assert len(entries(outs, i)) == h.final(req, i).usage.completion_tokens


def test_only_scored_rows_ask_for_logits():
    h = Harness(FakeRunner(batch=16), budget=16)
    h.submit(prompt(9, 20), max_tokens=1, prompt_logprobs=0)
    h.run()
    flagged = [pos for step in h.runner.decodes for _tok, pos, _seq, flag in step if flag]
    assert flagged == list(range(20))  # rows 0..18 score tokens 1..19; row 19 samples


def test_scoring_chunks_are_capped():
    h = Harness(FakeRunner(batch=64), budget=64)
    h.core.scorer.prompt_chunk = 10
    p = prompt(10, 45)
    req = h.submit(p, max_tokens=2, prompt_logprobs=0)
    h.run()
    assert max(len(step) for step in h.runner.decodes) <= 10
    check_prompt_scores(prompt_entries(h.outputs[req.request_id]), p, 0)
