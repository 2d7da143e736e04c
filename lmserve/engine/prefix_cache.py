"""KV slots and prefix reuse: which sequence id a new request runs in, and what it can keep.

Every llama.cpp sequence id is a slot. A slot that finished a request stays resident
(idle) with its tokens in the KV pool, so a later request that shares a token prefix
(a multi-turn chat, a shared system prompt) starts after that prefix. Idle slots are
evicted least recently used first. A running slot's prefix can also be shared: the KV
is unified, so copying a prefix to another sequence id only tags cells, it copies no data.

Resident idle KV is not free: llama.cpp attends over every cell up to the highest one in
use, masked or not, so idle prefixes slow every decode step (a single sequence decoding
beside ~7000 idle cells ran 30% slower here). The pool therefore keeps at most
`idle_tokens` idle tokens, besides the most recently released conversation, which is
always kept whole because it is the likeliest to continue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lmserve.engine.disk_cache import DiskCache
    from lmserve.engine.sequence import Sequence


class KVMemory(Protocol):
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...


def common_prefix_len(a: Seq[int], b: Seq[int]) -> int:
    """Length of the common prefix, by bisection over C-speed slice comparisons."""
    hi = min(len(a), len(b))
    if hi == 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV while idle
    owner: "Sequence | None" = None
    last_used: float = 0.0
    adapters: tuple[tuple[str, float], ...] = ()  # the LoRA set its KV was computed under

    @property
    def busy(self) -> bool:
        return self.owner is not None

    def kv_tokens(self) -> list[int]:
        if self.owner is not None:
            return self.owner.tokens[: self.owner.n_computed]
        return self.cached


@dataclass
class Placement:
    slot: Slot
    n_reused: int


class SlotPool:
    def __init__(self, n_slots: int, memory: KVMemory, *, min_share: int = 16,
                 idle_tokens: int | None = None) -> None:
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.memory = memory
        self.min_share = min_share  # shorter shared prefixes are not worth a copy
        self.idle_tokens = idle_tokens  # None: no budget, only LRU under KV pressure
        self.hits = 0
        self.reused_tokens = 0
        self.disk: "DiskCache | None" = None  # saved states of long prefixes (disk_cache.py)

    @property
    def n_free(self) -> int:
        return sum(1 for s in self.slots if not s.busy)

    @property
    def resident_tokens(self) -> int:
        return sum(len(s.cached) for s in self.slots if not s.busy)

    def place(self, seq: "Sequence", *, use_disk: bool = True) -> Placement | None:
        """Give `seq` a slot, reusing the longest resident (or, failing that, stored) prefix."""
        tokens = seq.tokens
        limit = seq.reuse_limit  # the last token is always recomputed to get its logits
        best: Slot | None = None
        best_len = 0
        for slot in self.slots:
            if slot.adapters != seq.request.adapters:
                continue
            n = common_prefix_len(slot.kv_tokens(), tokens)
            if n > best_len or (n == best_len and best is not None and best.busy and not slot.busy):
                best, best_len = slot, n
        best_len = min(best_len, limit)
        if use_disk and self.disk is not None and (placed := self._place_from_disk(seq, best_len)):
            return placed
        if best is not None and not best.busy and best_len > 0:
            empty = self._empty_slot()
            if empty is None or best_len >= len(best.cached):
                return self._take(best, seq, best_len)
            # Taking would truncate a longer resident conversation: share its prefix instead.
            self.memory.seq_cp(best.seq_id, empty.seq_id, 0, best_len)
            return self._assign(empty, seq, best_len)
        target = self._free_slot()
        if target is None:
            return None
        if best is not None and best.busy and best_len >= self.min_share:
            self.memory.seq_cp(best.seq_id, target.seq_id, 0, best_len)
            return self._assign(target, seq, best_len)
        return self._assign(target, seq, 0)

    def _place_from_disk(self, seq: "Sequence", resident: int) -> Placement | None:
        """Load a stored state that beats the resident prefix by min_tokens or more."""
        assert self.disk is not None
        hit = self.disk.find(seq.tokens, seq.request.adapters, limit=seq.reuse_limit,
                             at_least=resident + self.disk.min_tokens)
        target = self._free_slot() if hit is not None else None
        if hit is None or target is None:
            return None
        loaded = self.disk.restore(hit, target.seq_id)
        if not loaded:  # the target is empty now, and may have been the best resident slot
            return self.place(seq, use_disk=False)
        return self._assign(target, seq, loaded)

    def reserve(self, seq: "Sequence") -> Slot:
        """A slot with no reuse (for a sibling that will copy its KV from another slot)."""
        slot = self._free_slot()
        if slot is None:
            raise RuntimeError("no free slot to reserve")
        return self._assign(slot, seq, 0).slot

    def _take(self, slot: Slot, seq: "Sequence", keep: int) -> Placement:
        if not self.memory.seq_rm(slot.seq_id, keep, -1):
            # Some memories (recurrent, sliding-window) cannot drop a suffix: start over.
            self.memory.seq_rm(slot.seq_id, -1, -1)
            keep = 0
        return self._assign(slot, seq, keep)

    def _assign(self, slot: Slot, seq: "Sequence", reused: int) -> Placement:
        slot.owner, slot.cached, slot.adapters = seq, [], seq.request.adapters
        if reused:
            self.hits += 1
            self.reused_tokens += reused
        return Placement(slot, reused)

    def _empty_slot(self) -> Slot | None:
        return next((s for s in self.slots if not s.busy and not s.cached), None)

    def _free_slot(self) -> Slot | None:
        """An empty slot, else the least recently used idle one, evicted."""
        empty = self._empty_slot()
        if empty is not None:
            return empty
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        victim = min(idle, key=lambda s: s.last_used)
        self.evict(victim)
        return victim

    def evict(self, slot: Slot) -> None:
        self.memory.seq_rm(slot.seq_id, -1, -1)
        slot.cached = []

    def evict_lru_idle(self) -> bool:
        idle = [s for s in self.slots if not s.busy and s.cached]
        if not idle:
            return False
        self.evict(min(idle, key=lambda s: s.last_used))
        return True

    def release(self, slot: Slot, *, keep: bool = True) -> None:
        """A sequence is done with its slot; its KV stays resident for reuse unless keep=False."""
        owner = slot.owner
        slot.owner = None
        slot.last_used = time.monotonic()
        if keep and owner is not None:
            slot.cached = owner.tokens[: owner.n_computed]
            if self.disk is not None:
                self.disk.offer(slot.seq_id, slot.cached, slot.adapters)
            self._enforce_budget(newest=slot)
        else:
            self.evict(slot)

    def _enforce_budget(self, newest: Slot) -> None:
        if self.idle_tokens is None:
            return
        budget = self.idle_tokens
        others = sorted((s for s in self.slots if not s.busy and s.cached and s is not newest),
                        key=lambda s: s.last_used)
        excess = sum(len(s.cached) for s in others) - budget
        for victim in others:
            if excess <= 0:
                break
            excess -= len(victim.cached)
            self.evict(victim)

    def flush(self) -> int:
        """Drop every idle slot's KV (the prefix cache); returns how many were dropped."""
        dropped = 0
        for slot in self.slots:
            if not slot.busy and slot.cached:
                self.evict(slot)
                dropped += 1
        return dropped
