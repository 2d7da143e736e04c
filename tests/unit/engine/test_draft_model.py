"""Draft-model speculation: the drafter's KV bookkeeping, and EngineCore verifying its guesses.

Both the target and the draft context are fake runners that check that every decode continues
each sequence's KV exactly, so a guess left in either KV, or a position off by one, fails."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lmserve.core.request import SamplingParams
from lmserve.engine.draft_model import ModelDrafter, vocabulary_mismatch
from lmserve.engine.scheduler import EngineCore
from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import EOS, VOCAB, FakeRunner
from tests.unit.engine.test_lookup import PROMPTS, PatternRunner, repeating
from tests.unit.engine.test_lookup import run as run_engine


class DraftFake(FakeRunner):
    """A fake draft model: it guesses the target's pattern, except where `wrong` says."""

    def __init__(self, *, wrong: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.wrong = wrong  # every wrong-th position is guessed wrong (0: never)
        self.clears = 0

    def logits_row(self, batch_index: int) -> np.ndarray:
        token, pos, _seq, logits = self.batch.entries[batch_index]
        assert logits, "read a row decoded without logits"
        guess = repeating(token, pos)
        if self.wrong and pos % self.wrong == 0:
            guess = guess % (VOCAB - 1) + 1
        row = np.zeros(VOCAB, dtype=np.float32)
        row[guess] = 1.0
        return row

    def clear(self) -> None:
        self.kv.clear()
        self.clears += 1


def run(prompts: list[list[int]], *, draft: DraftFake | None, max_tokens: int = 40,
        budget: int = 64, lookup: int = 0, stop: list[str] | None = None,
        catchup: int | None = None) -> tuple[list[list[int]], EngineCore]:
    """test_lookup's run, 4 sequences at a time, with a drafter over `draft` (None: none)."""
    drafter = None if draft is None else ModelDrafter(
        draft, max_tokens=6, n_seqs=4, n_vocab=VOCAB, eog_tokens={EOS}, catchup_tokens=catchup)
    outputs, core, _ = run_engine(prompts, lookup=lookup, max_tokens=max_tokens, budget=budget,
                                  stop=stop, drafter=drafter)
    return outputs, core


@pytest.mark.parametrize("wrong", [0, 5])
@pytest.mark.parametrize("budget", [64, 7])
def test_draft_model_changes_no_output(wrong, budget):
    plain, plain_core = run(PROMPTS, draft=None, budget=budget)
    draft = DraftFake(wrong=wrong)
    spec, core = run(PROMPTS, draft=draft, budget=budget)
    assert spec == plain
    stats = core.stats
    assert stats.model_draft_tokens > 0 and stats.draft_tokens == 0  # lookup is off
    if wrong:
        assert 0 < stats.model_accepted_tokens < stats.model_draft_tokens
    else:
        assert stats.model_accepted_tokens == stats.model_draft_tokens
        assert budget < 64 or stats.steps < plain_core.stats.steps / 2
    assert core.drafter is not None and core.drafter.tracked == 0  # all freed at the end
    assert all(not cells for cells in draft.kv.values())


def test_draft_kv_follows_each_sequence():
    """After every step, each tracked sequence's draft KV is a prefix of its tokens plus the
    guesses decoded after them (checked by the fake at every decode), and rejected guesses
    are cut: a draft model wrong every 3rd position still gives the plain output."""
    plain, _ = run(PROMPTS, draft=None, max_tokens=50)
    spec, core = run(PROMPTS, draft=DraftFake(wrong=3), max_tokens=50)
    assert spec == plain
    assert core.stats.model_accepted_tokens < core.stats.model_draft_tokens


def test_long_prompts_are_fed_to_the_draft_in_chunks():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 5
    draft = DraftFake()
    plain, _ = run([prompt], draft=None)
    spec, core = run([prompt], draft=draft, catchup=16)
    assert spec == plain
    first = [entries for entries in draft.decodes if len(entries) > 1]
    assert first and all(len(entries) <= 16 for entries in draft.decodes)
    assert core.stats.model_accepted_tokens > 0


def test_stops_and_max_tokens_cut_a_verified_draft():
    for max_tokens in (1, 2, 9):
        plain, _ = run(PROMPTS, draft=None, max_tokens=max_tokens)
        spec, _ = run(PROMPTS, draft=DraftFake(), max_tokens=max_tokens)
        assert spec == plain
    plain, _ = run(PROMPTS, draft=None, stop=["<7><8>"])
    spec, _ = run(PROMPTS, draft=DraftFake(), stop=["<7><8>"])
    assert spec == plain


def test_a_full_draft_context_is_cleared_and_refilled():
    draft = DraftFake(kv_capacity=40)
    plain, _ = run(PROMPTS, draft=None)
    spec, core = run(PROMPTS, draft=draft)
    assert spec == plain
    assert draft.clears > 0 and core.drafter is not None and core.drafter.failures > 0


def test_prompt_lookup_drafts_first_and_the_model_the_rest():
    plain, _ = run(PROMPTS, draft=None)
    spec, core = run(PROMPTS, draft=DraftFake(wrong=4), lookup=8)
    assert spec == plain
    assert core.stats.draft_tokens > 0 and core.stats.model_draft_tokens > 0


def test_cancelled_sequences_free_their_draft_ids():
    runner = PatternRunner()
    draft = DraftFake()
    drafter = ModelDrafter(draft, max_tokens=4, n_seqs=2, n_vocab=VOCAB)
    core = EngineCore(runner, n_slots=4, max_running=2, step_tokens=64, sink=lambda _: None,
                      drafter=drafter)
    for _ in range(3):
        request = EngineRequest(prompt_tokens=[1, 2, 3], max_tokens=100,
                                sampling=SamplingParams(temperature=0))
        core.add(request)
        for _ in range(4):
            core.step()
        assert drafter.tracked == 1
        core.abort(request.request_id)
        assert drafter.tracked == 0 and not any(draft.kv.values())


@dataclass(frozen=True)
class _Info:
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    add_bos: bool = False


@dataclass
class _Vocab:
    texts: list[bytes]
    vocab_type: int = 2
    info: _Info = _Info()

    @property
    def n_vocab(self) -> int:
        return len(self.texts)

    def token_bytes(self, token: int) -> bytes:
        return self.texts[token]


def test_vocabulary_checks():
    base = [b"<s>", b"</s>", b"a", b"b", b"c"]
    assert vocabulary_mismatch(_Vocab(base), _Vocab(list(base))) is None  # type: ignore[arg-type]
    assert vocabulary_mismatch(_Vocab(base), _Vocab(base + [b"pad"])) is None  # type: ignore[arg-type]
    why = vocabulary_mismatch(_Vocab(base), _Vocab([*base[:3], b"x", b"c"]))  # type: ignore[arg-type]
    assert why is not None and "token 3" in why
    why = vocabulary_mismatch(_Vocab(base), _Vocab(base, vocab_type=1))  # type: ignore[arg-type]
    assert why is not None and "tokenizer types" in why
    why = vocabulary_mismatch(_Vocab(base), _Vocab(base + [b"p"] * 200))  # type: ignore[arg-type]
    assert why is not None and "5 tokens against 205" in why
    why = vocabulary_mismatch(_Vocab(base), _Vocab(base, info=_Info(eos_token="<eos>")))  # type: ignore[arg-type]
    assert why is not None and "begin/end" in why
