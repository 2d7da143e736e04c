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
    """An adaptive draft size per sequence: grows while drafts are taken whole, shrinks to
    what was accepted when one is cut short, so a sequence that stops repeating its context
    soon costs little."""

    def __init__(self, maximum: int, minimum: int = 2) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.current = maximum

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.maximum, self.current + 2)
        else:
            self.current = max(self.minimum, accepted + 1)
