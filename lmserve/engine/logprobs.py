"""Log-probabilities read from llama.cpp's logits rows without copying a row into Python.

A row is a numpy view over the context's logits buffer (n_vocab floats, up to 262k). The
log-sum-exp runs through one reused scratch buffer and the top-k through np.argpartition, both
O(n_vocab) in C; Python touches only the k + 1 numbers it returns.

The numbers are the model's own distribution, log_softmax of the raw logits: before logit bias,
penalties, grammar, temperature and truncation. OpenAI documents logprobs as the model's, and
both vLLM (logprobs_mode "raw_logprobs", its default) and llama.cpp's server
(post_sampling_probs false, its default) report the same. So a token that a grammar, a bias or a
penalty steered towards can show a low logprob and need not be the top alternative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lmserve.core.events import TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from lmserve.engine.sequence import Sequence

# Prompt logprobs need logits for every prompt row. llama.cpp keeps an output buffer as large as
# the largest step asked for (rows x n_vocab floats), so a scoring prompt goes in chunks that
# keep it near this size: 341 rows at a 49k vocabulary, 64 at 262k.
SCORE_BUFFER_BYTES = 64 << 20
MIN_SCORE_CHUNK = 16
_WINDOWS = (8.0, 24.0)  # logit distances below the peak searched before the whole row


class LogitsSource(Protocol):
    n_vocab: int
    def logits_row(self, batch_index: int) -> np.ndarray: ...
    def token_bytes(self, token: int) -> bytes: ...


class LogitsFlags(Protocol):
    def request_logits(self, start: int, stop: int) -> None: ...


@dataclass
class _PromptRows:
    """Batch rows whose logits score prompt tokens first..last (row i scores token first + i)."""

    seq: Sequence
    first_row: int
    first: int
    last: int


def log_normalizer(row: np.ndarray, scratch: np.ndarray) -> float:
    """log(sum(exp(row))), computed stably in `scratch` (same shape and dtype as `row`)."""
    peak = float(row.max())
    if not math.isfinite(peak):
        return peak
    np.subtract(row, peak, out=scratch)
    np.exp(scratch, out=scratch)
    return peak + math.log(float(scratch.sum()))


def top_tokens(row: np.ndarray, k: int) -> list[int]:
    """The indices of k largest entries, largest first, equal values by token id (which of
    several tokens tied at the k-th value are kept is not specified)."""
    k = min(k, row.shape[0])
    if k <= 0:
        return []
    if k == 1:
        return [int(row.argmax())]
    peak = float(row.max())
    for window in _WINDOWS:
        # Exact: if k entries lie within `window` of the peak, the top k are among them. One
        # compare pass is ~10x cheaper than np.argpartition over the whole row.
        candidates = np.flatnonzero(row >= peak - window)
        if len(candidates) >= k:
            break
    else:
        candidates = np.arange(row.shape[0])
    values = row[candidates]
    part = np.argpartition(values, -k)[-k:] if len(candidates) > k else np.arange(k)
    ids, top = candidates[part], values[part]
    ranked: list[int] = ids[np.lexsort((ids, -top))].tolist()
    return ranked


class LogprobScorer:
    """Computes TokenLogprobs for the sequences that asked; the others never reach it."""

    def __init__(self, source: LogitsSource) -> None:
        self.source = source
        self.prompt_chunk = max(MIN_SCORE_CHUNK, SCORE_BUFFER_BYTES // (4 * max(1, source.n_vocab)))
        self._scratch: np.ndarray | None = None
        self._rows: dict[int, tuple[float, tuple[TopLogprob, ...]]] = {}  # this step's, by index
        self._prompt_rows: list[_PromptRows] = []

    def reset(self) -> None:
        """A new batch: forget the previous step's rows."""
        if self._rows:
            self._rows.clear()
        if self._prompt_rows:
            self._prompt_rows.clear()

    # -- sampled tokens ---------------------------------------------------------------------
    def sampled(self, seq: Sequence, batch_index: int, token: int) -> None:
        """Score the token just sampled from a row; n > 1 siblings share the row's work."""
        k = seq.request.logprobs or 0
        row = self.source.logits_row(batch_index)
        cached = self._rows.get(batch_index)
        if cached is None or len(cached[1]) < min(k, row.shape[0]):
            lse = self._normalizer(row)
            cached = (lse, self._top(row, k, lse))
            self._rows[batch_index] = cached
        lse, top = cached
        seq.sampled_logprob = self._entry(row, token, lse, top[:k])

    # -- prompt tokens ----------------------------------------------------------------------
    def mark_prompt_rows(self, batch: LogitsFlags, seq: Sequence, start: int, n: int,
                         first_index: int) -> None:
        """Ask for logits on the rows of this chunk (positions start..start+n-1, from batch
        index first_index) that score prompt tokens not scored yet; the row at position p
        scores token p + 1."""
        scores = seq.request.prompt_scores
        assert scores is not None
        if not scores:  # nothing precedes the first prompt token
            token = seq.tokens[0]
            scores.append(TokenLogprob(token, self.source.token_bytes(token), None))
        first, last = max(len(scores), start + 1), min(start + n, seq.n_prompt - 1)
        if first > last:
            return
        first_row = first_index + (first - 1 - start)
        batch.request_logits(first_row, first_row + last - first + 1)
        self._prompt_rows.append(_PromptRows(seq, first_row, first, last))

    def score_prompts(self) -> None:
        """After a successful decode: score the marked prompt rows."""
        for rows in self._prompt_rows:
            scores, tokens = rows.seq.request.prompt_scores, rows.seq.tokens
            assert scores is not None and len(scores) == rows.first
            k = rows.seq.request.prompt_logprobs or 0
            for i, target in enumerate(range(rows.first, rows.last + 1)):
                row = self.source.logits_row(rows.first_row + i)
                lse = self._normalizer(row)
                scores.append(self._entry(row, tokens[target], lse, self._top(row, k, lse)))
        self._prompt_rows.clear()

    # -- helpers ----------------------------------------------------------------------------
    def _normalizer(self, row: np.ndarray) -> float:
        scratch = self._scratch
        if scratch is None or scratch.shape != row.shape or scratch.dtype != row.dtype:
            scratch = self._scratch = np.empty_like(row)
        return log_normalizer(row, scratch)

    def _top(self, row: np.ndarray, k: int, lse: float) -> tuple[TopLogprob, ...]:
        ids = top_tokens(row, k)
        if not ids:
            return ()
        piece = self.source.token_bytes
        values = row[ids].tolist()
        return tuple(TopLogprob(t, piece(t), v - lse) for t, v in zip(ids, values, strict=True))

    def _entry(self, row: np.ndarray, token: int, lse: float,
               top: tuple[TopLogprob, ...]) -> TokenLogprob:
        return TokenLogprob(token, self.source.token_bytes(token), float(row[token]) - lse, top)
