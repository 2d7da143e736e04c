"""Speculative decoding with a draft model: a smaller GGUF with the target's vocabulary guesses
the next tokens of every decoding sequence, and the target verifies them in its own batch.

The draft model runs in its own llama.cpp context on the engine thread. Each sequence that
drafts gets a sequence id there, and the draft context's KV holds a prefix of the sequence's
tokens (`_Track.tokens`). Before drafting, that prefix is cut back to what the sequence still
holds (the target rejected guesses, or kept a token the draft did not propose) and the rest
of the sequence is fed: at first the whole prompt, in chunks under a per-step budget so that
a long prompt does not stall the other sequences' steps. Then the draft greedily proposes up
to the sequence's draft length, one batch per drafted token for all drafting sequences at
once. The target verifies the guesses exactly as it verifies prompt-lookup drafts
(EngineCore._verify), so the output is the one plain decoding gives.

A model's own MTP / NextN layers draft instead with `--draft mtp` (engine.mtp_draft).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np

from lmserve.engine.lookup import DraftLength
from lmserve.engine.sequence import Sequence

if TYPE_CHECKING:  # llama.cpp is loaded only where models are (check_files)
    from lmserve.engine.runner import Model

DECODE_OK = 0
# enum llama_vocab_type
_VOCAB_TYPES = {0: "none", 1: "SentencePiece (SPM)", 2: "byte-level BPE", 3: "WordPiece",
                4: "Unigram (UGM)", 5: "RWKV", 6: "PLaMo-2"}
VOCAB_SIZE_SLACK = 128  # tokens a draft's vocabulary may have more or fewer (llama.cpp's rule)
MTP_DRAFT = "mtp"  # --draft's value that drafts with the model's own MTP / NextN layers


class DraftBatch(Protocol):
    capacity: int
    @property
    def n(self) -> int: ...
    def clear(self) -> None: ...
    def add(self, tokens: Tokens[int], start_pos: int, seq_id: int,
            want_last_logits: bool) -> int: ...


DB = TypeVar("DB", bound=DraftBatch)


class DraftRunner(Protocol[DB]):
    """What the drafter needs of its context (runner.Context, or a fake in the unit tests)."""

    @property
    def batch(self) -> DB: ...
    def decode(self, batch: DB) -> int: ...
    def logits_row(self, batch_index: int) -> np.ndarray: ...
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def clear(self) -> None: ...


class VocabularyMismatch(ValueError):
    pass


def vocabulary_mismatch(target: Model, draft: Model) -> str | None:
    """Why `draft` cannot draft for `target` (None: it can). Token ids are handed from one
    model to the other, so both must read every id the same way: the same tokenizer type,
    the same begin/end tokens, and the same text for every id both have (the sizes may differ
    by padding, as llama.cpp's own speculative decoding allows)."""
    if target.vocab_type != draft.vocab_type:
        return (f"tokenizer types differ ({_VOCAB_TYPES.get(target.vocab_type, '?')} against "
                f"{_VOCAB_TYPES.get(draft.vocab_type, '?')})")
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_SIZE_SLACK:
        return f"{target.n_vocab} tokens against {draft.n_vocab}"
    t, d = target.info, draft.info
    if (t.bos_token, t.eos_token, t.add_bos) != (d.bos_token, d.eos_token, d.add_bos):
        return (f"begin/end tokens differ ({t.bos_token!r}/{t.eos_token!r} against "
                f"{d.bos_token!r}/{d.eos_token!r})")
    for token in range(min(target.n_vocab, draft.n_vocab)):
        a, b = target.token_bytes(token), draft.token_bytes(token)
        if a != b:
            return f"token {token} is {a!r} in one and {b!r} in the other"
    return None


def check_vocabulary(target: Model, draft: Model, target_name: str) -> None:
    """Raise VocabularyMismatch, naming both models, unless `draft` shares `target`'s
    vocabulary."""
    why = vocabulary_mismatch(target, draft)
    if why is not None:
        raise VocabularyMismatch(
            f"the draft model {draft.path} does not share the vocabulary of the model "
            f"{target_name} ({target.path}): {why}; a draft model must use the same "
            f"tokenizer")


def check_mtp(target: Model, target_name: str) -> None:
    """ValueError unless `target` carries MTP / NextN layers to draft with (--draft mtp)."""
    from lmserve.engine.runner import mtp_supported

    if not target.nextn_layers:
        raise ValueError(f"--draft mtp: the model {target_name} ({target.path}) carries no "
                         f"MTP / NextN layers (its GGUF has no nextn_predict_layers); draft "
                         f"with a smaller model (--draft MODEL) or --lookup instead")
    if not mtp_supported():
        raise ValueError("--draft mtp: this llama.cpp build does not export the MTP "
                         "functions (llama_get_embeddings_nextn)")


def check_files(target_path: str, draft_path: str, target_name: str) -> None:
    """check_vocabulary on the two files' vocabularies alone (no weights), before loading;
    ValueError too when llama.cpp cannot read either file."""
    from lmserve.engine.runner import Model

    try:
        target = Model(target_path, header_only=True)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
    if draft_path == MTP_DRAFT:
        try:
            check_mtp(target, target_name)
        finally:
            target.close()
        return
    try:
        try:
            draft = Model(draft_path, header_only=True)
        except RuntimeError as exc:
            raise ValueError(f"the draft model: {exc}") from None
        try:
            check_vocabulary(target, draft, target_name)
        finally:
            draft.close()
    finally:
        target.close()


@dataclass(eq=False)
class _Track:
    """One sequence's place in the draft context: its id there and the tokens whose KV the
    draft context holds (a prefix of the sequence, then the guesses it decoded)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)


class _HasSeqId(Protocol):
    seq_id: int


TR = TypeVar("TR", bound=_HasSeqId)


class Tracks(Generic[TR]):
    """A drafting context's sequence ids, and the track of each engine sequence that holds
    one: both drafters (a draft model's, the MTP head's) keep their per-sequence state here.
    A sequence gets an id when it first drafts (none when all are taken: it does not draft)
    and gives it back, its KV removed, when it is forgotten."""

    def __init__(self, n_seqs: int, make: Callable[[int], TR],
                 seq_rm: Callable[[int, int, int], bool]) -> None:
        self._free = list(range(n_seqs - 1, -1, -1))
        self._by_seq: dict[Sequence, TR] = {}
        self._make = make
        self._seq_rm = seq_rm

    def __len__(self) -> int:
        return len(self._by_seq)

    def __getitem__(self, seq: Sequence) -> TR:
        return self._by_seq[seq]

    def get(self, seq: Sequence) -> TR | None:
        return self._by_seq.get(seq)

    def values(self) -> Iterable[TR]:
        return self._by_seq.values()

    def take(self, seq: Sequence) -> TR | None:
        """The sequence's track, a new one on a free id at its first call."""
        track = self._by_seq.get(seq)
        if track is None and self._free:
            track = self._by_seq[seq] = self._make(self._free.pop())
        return track

    def release(self, seq: Sequence) -> None:
        track = self._by_seq.pop(seq, None)
        if track is not None:
            self._seq_rm(track.seq_id, -1, -1)
            self._free.append(track.seq_id)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def _length(maximum: int, row_cost: float) -> DraftLength:
    """A draft length that tries drafting at first: its prior acceptance rate lies halfway
    between the row cost and 1 (prompt lookup's 0.75 would never try a costly draft)."""
    prior = max(0.75, (1.0 + row_cost) / 2)
    return DraftLength(maximum, row_cost=row_cost, prior=(4.0 * prior, 4.0))


class ModelDrafter(Generic[DB]):
    """Greedy drafts from a draft model for the engine's decoding sequences."""

    def __init__(self, ctx: DraftRunner[DB], *, max_tokens: int, n_seqs: int, n_vocab: int,
                 eog_tokens: Iterable[int] = (), row_cost: float = 0.5,
                 catchup_tokens: int | None = None,
                 length: Callable[[int, float], DraftLength] | None = None) -> None:
        self.ctx = ctx
        self.max_tokens = max_tokens
        self.n_vocab = n_vocab  # the target's: a guess past it ends the draft
        self.eog_tokens = frozenset(eog_tokens)
        # A guessed token costs a verification row of the target and a decode row of the
        # draft model; DraftLength stops drafting when the guesses are right less often.
        self.row_cost = row_cost
        self.catchup_tokens = catchup_tokens or ctx.batch.capacity
        self._tracks = Tracks(n_seqs, _Track, ctx.seq_rm)
        self._length = length or _length
        self.failures = 0  # draft decodes that failed (the draft context was cleared)

    def length(self) -> DraftLength:
        """A new sequence's draft length controller."""
        return self._length(self.max_tokens, self.row_cost)

    @property
    def tracked(self) -> int:
        return len(self._tracks)

    def forget(self, seq: Sequence) -> None:
        """Free a finished, cancelled or preempted sequence's KV in the draft context."""
        self._tracks.release(seq)

    def observe(self, rows: Tokens[tuple[Sequence, int, int, Tokens[int]]]) -> None:
        """The target's decoded rows: a draft model catches up from the tokens alone."""

    def draft(self, wanted: list[tuple[Sequence, int]]) -> dict[Sequence, list[int]]:
        """Up to `limit` guesses for each (sequence, limit), after the pending token (the
        sequence's last); a sequence whose prompt is still being fed to the draft context
        gets none this step."""
        batch = self.ctx.batch
        batch.clear()
        budget = min(self.catchup_tokens, batch.capacity)
        rows: dict[Sequence, int] = {}
        for seq, limit in wanted:
            track = self._tracks.take(seq)
            if track is None or limit <= 0:
                continue
            tokens = seq.tokens
            keep = min(_common_prefix(track.tokens, tokens), len(tokens) - 1)
            if keep < len(track.tokens):  # rejected guesses, or a token the draft missed
                self.ctx.seq_rm(track.seq_id, keep, -1)
                del track.tokens[keep:]
            feed = tokens[keep:]
            if budget <= 0:
                break
            part = feed[:budget]
            complete = len(part) == len(feed)
            idx = batch.add(part, keep, track.seq_id, complete)
            track.tokens.extend(part)
            budget -= len(part)
            if complete:
                rows[seq] = idx
        if batch.n == 0 or not self._decode():
            return {}
        limits = dict(wanted)
        drafts: dict[Sequence, list[int]] = {}
        while rows:
            guesses = {seq: int(np.argmax(self.ctx.logits_row(idx))) for seq, idx in rows.items()}
            batch.clear()
            rows = {}
            for seq, token in guesses.items():
                if token >= self.n_vocab:
                    continue
                draft = drafts.setdefault(seq, [])
                draft.append(token)
                if len(draft) >= limits[seq] or token in self.eog_tokens:
                    continue
                track = self._tracks[seq]
                rows[seq] = batch.add([token], len(track.tokens), track.seq_id, True)
                track.tokens.append(token)
            if rows and not self._decode():
                break
        return drafts

    def _decode(self) -> bool:
        """Decode the draft batch; on failure (no KV room) clear the draft context, so every
        sequence is fed again from the start when it next drafts."""
        if self.ctx.decode(self.ctx.batch) == DECODE_OK:
            return True
        self.failures += 1
        self.ctx.clear()
        for track in self._tracks.values():
            track.tokens.clear()
        return False
