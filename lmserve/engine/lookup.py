"""Prompt-lookup drafts for speculative decoding, with no draft model.

Text that repeats its context (an edit of a given document, code that restates its input,
quotes, lists that continue a pattern) can be guessed from the sequence itself: find the
latest earlier place where the last few tokens occurred and propose what followed them there.
The engine verifies the whole draft in one llama_decode, next to the other sequences' tokens,
and keeps the longest prefix the sampler agrees with (see EngineCore._verify).

The index maps every n-gram (for each n in `sizes`) to the position right after its latest
occurrence, and grows by one entry per size per token, so a lookup costs a few dict probes
whatever the length of the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """Where each recent n-gram of one token sequence continued."""

    def __init__(self, sizes: Sequence[int] = (3, 2)) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))  # the longest match is tried first
        self._after: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # tokens[:_indexed] have their n-grams registered

    def update(self, tokens: Sequence[int]) -> None:
        """Register the n-grams of tokens added since the last call (tokens only grow)."""
        start = max(self._indexed, 1)
        after = self._after
        for end in range(start, len(tokens)):  # the n-gram ending at end-1 continued at end
            for n in self.sizes:
                if end >= n:
                    after[tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(tokens))

    def draft(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the sequence's
        last n tokens (longest n first); [] when nothing matches."""
        if limit <= 0:
            return []
        self.update(tokens)
        length = len(tokens)
        for n in self.sizes:
            if length <= n:
                continue
            start = self._after.get(tuple(tokens[length - n:]))
            if start is not None and start < length:
                return list(tokens[start:start + limit])
        return []


class DraftLength:
    """How many tokens to draft for one sequence.

    The size follows the drafts: it grows by 2 while they are taken whole and drops to what
    was accepted + 1 when one is cut short, so copying stretches (long, clustered runs of
    right guesses) soon draft the maximum again after a miss. Whether to draft at all
    follows the acceptance rate p: a guessed row costs about `row_cost` of a plain decode
    step on the CPUs measured (SmolLM2, 2 threads: 4.5 ms a row against 9 ms a step; Gemma 3
    270M: 6 against 13 ms), so a sequence whose guesses are right less often than that
    loses time by drafting and stops. p is estimated from its recent drafts (each older one
    weighs `decay` as much); while it does not draft, the evidence fades back toward the
    prior with every step, so drafting is retried a few steps later.
    """

    def __init__(self, maximum: int, minimum: int = 2, *, row_cost: float = 0.5,
                 prior: tuple[float, float] = (3.0, 4.0), decay: float = 0.6,
                 fade: float = 0.95) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.size = maximum
        self.row_cost = row_cost
        self.prior = prior  # (right guesses, judged guesses): p = 0.75 before any evidence
        self.hits, self.tries = prior
        self.decay = decay
        self.fade = fade

    @property
    def rate(self) -> float:
        return self.hits / self.tries

    @property
    def current(self) -> int:
        return self.size if self.rate > self.row_cost else 0

    def update(self, drafted: int, accepted: int) -> None:
        """A verified draft: `accepted` right guesses, then a wrong one unless all were."""
        if drafted == 0:
            return
        if accepted == drafted:
            self.size = min(self.maximum, self.size + 2)
        else:
            self.size = max(self.minimum, accepted + 1)
        judged = accepted + (1 if accepted < drafted else 0)
        self.hits = self.hits * self.decay + accepted
        self.tries = self.tries * self.decay + judged

    def skipped(self) -> None:
        """A decode step without a draft."""
        hits0, tries0 = self.prior
        self.hits = hits0 + (self.hits - hits0) * self.fade
        self.tries = tries0 + (self.tries - tries0) * self.fade
