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

With split KV (`packed`), each sequence id is its own stream, and llama.cpp cuts a batch
into micro-batches of consecutive sequence ids only: running sequences on ids 0, 2, 4, ...
cost one graph each (8 decoding sequences took 62 ms a step on even ids against 35 ms on
0..7). A packed pool therefore puts new sequences where they extend or join a run of busy
ids, and copies a reusable prefix to such a slot rather than running where it lies. Among
slots that add no run, it fills a hole inside the busy span before it widens the span: when
several sequences end in one step, their replacements then close the hole they left
instead of growing a second run beside the first (Gemma 3 at 16 clients: 377 of 750 full
decode steps ran as two graphs before).

Sessions pin their KV: a request that carries a session key (`pin`) leaves its slot pinned to
that session when it ends, and a pinned idle slot is neither evicted by LRU or the idle budget
nor taken over by another request (which may still copy a prefix from it), so the session's
next turn starts after everything the last one computed. Pins are bounded: at most
`max_pinned` slots (the engine passes its cache slots, so running sequences always find a
slot) and `pin_tokens` tokens; a new pin over either limit unpins the least recently used
sessions first, which leaves their KV as ordinary idle cache. Only a KV pool that runs out
evicts a pinned slot, after every unpinned one. `unpin` ends a session's pin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lmserve.engine.token_prefix import common_prefix_len

if TYPE_CHECKING:
    from lmserve.engine.disk_cache import DiskHit, SavedStates


class KVMemory(Protocol):
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...


class _Adapters(Protocol):
    @property
    def adapters(self) -> tuple[tuple[str, float], ...]: ...
    @property
    def pin(self) -> str | None: ...


class Occupant(Protocol):
    """What the pool reads of a sequence it places (a sequence.Sequence), so this module
    does not import sequence.py, which refers to Slot."""

    @property
    def request(self) -> _Adapters: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def n_computed(self) -> int: ...
    @property
    def reuse_limit(self) -> int: ...


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV while idle
    owner: Occupant | None = None
    last_used: float = 0.0
    adapters: tuple[tuple[str, float], ...] = ()  # the LoRA set its KV was computed under
    pin: str | None = None  # idle, held for this session: not evicted, not taken by others

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
                 idle_tokens: int | None = None, packed: bool = False,
                 max_pinned: int | None = None, pin_tokens: int | None = None) -> None:
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.memory = memory
        self.min_share = min_share  # shorter shared prefixes are not worth a copy
        self.packed = packed  # split KV: keep busy slots on consecutive ids, copies cost data
        self.idle_tokens = idle_tokens  # None: no budget, only LRU under KV pressure
        # Session pins: at most this many slots (default all but one) and tokens (None: any).
        self.max_pinned = n_slots - 1 if max_pinned is None else max_pinned
        self.pin_tokens = pin_tokens
        self.pins: dict[str, Slot] = {}  # session key -> its idle pinned slot
        self.pins_dropped = 0  # pins ended by the budget or KV pressure, not by unpin
        self.hits = 0
        self.reused_tokens = 0
        self.disk: SavedStates | None = None  # saved states: disk and/or RAM (disk_cache.py)
        self.deferred = False  # the last place() returned None because a state file is read

    @property
    def n_free(self) -> int:
        """Slots a new sequence can have: neither busy nor pinned to a session."""
        return sum(1 for s in self.slots if not s.busy and s.pin is None)

    @property
    def resident_tokens(self) -> int:
        return sum(len(s.cached) for s in self.slots if not s.busy)

    @property
    def pinned_tokens(self) -> int:
        return sum(len(s.cached) for s in self.pins.values())

    def place(self, seq: Occupant, *, use_disk: bool = True) -> Placement | None:
        """Give `seq` a slot, reusing the longest resident (or, failing that, stored) prefix.
        None: no slot, or (`deferred`) its stored prefix is still being read from disk."""
        self.deferred = False
        tokens = seq.tokens
        best: Slot | None = None
        best_len = 0
        for slot in self.slots:
            if slot.adapters != seq.request.adapters:
                continue
            n = common_prefix_len(slot.kv_tokens(), tokens)
            if n > best_len or (n == best_len and best is not None and best.busy and not slot.busy):
                best, best_len = slot, n
        best_len = min(best_len, seq.reuse_limit)  # the last token is recomputed for its logits
        if use_disk and self.disk is not None and (hit := self._disk_hit(seq, best_len)):
            if not self.disk.ready(hit):
                self.deferred = True  # its file is still being read: admit it at a later step
                return None
            if placed := self._place_from_disk(seq, hit):
                return placed
        target = self._pick_free()
        if target is None:
            return None
        if best is not None and not best.busy and best_len > 0 \
                and best.pin in (None, seq.request.pin):  # another session's: copy, never take
            # Taking runs in place and drops what the resident conversation has past the
            # shared prefix; fine when that is nothing, or when no empty slot is left anyway.
            continues = best_len >= len(best.cached)  # the resident conversation's next turn
            loses_nothing = target is best or continues or bool(target.cached)
            bounds = self._busy_bounds()
            # A continuation runs in place even where the layout would rather use `target`
            # when `target` holds another conversation: copying there would evict that one
            # (measured: 48 interleaved conversations kept 0.65 of their prompts cached).
            if loses_nothing and (self._layout(best, bounds) <= self._layout(target, bounds)
                                  or (continues and bool(target.cached))):
                return self._take(best, seq, best_len)
        # Sharing copies the prefix to `target`: free in a unified pool (cells are tagged), a
        # stream copy with split KV, so short prefixes are not worth it there.
        worth_copy = best_len >= (self.min_share if best is not None and
                                  (best.busy or self.packed) else 1)
        self._clear(target)
        if best is not None and worth_copy:
            self.memory.seq_cp(best.seq_id, target.seq_id, 0, best_len)
            return self._assign(target, seq, best_len)
        return self._assign(target, seq, 0)

    def _disk_hit(self, seq: Occupant, resident: int) -> DiskHit | None:
        """A stored state that beats the resident prefix by min_tokens or more."""
        assert self.disk is not None
        return self.disk.find(seq.tokens, seq.request.adapters, limit=seq.reuse_limit,
                              at_least=resident + self.disk.min_tokens)

    def _place_from_disk(self, seq: Occupant, hit: DiskHit) -> Placement | None:
        """Load `hit` into a free slot (its file already read, see DiskCache.ready)."""
        assert self.disk is not None
        target = self._free_slot()
        if target is None:
            return None
        loaded = self.disk.restore(hit, target.seq_id)
        if not loaded:  # the target is empty now, and may have been the best resident slot
            return self.place(seq, use_disk=False)
        return self._assign(target, seq, loaded)

    def reserve(self, seq: Occupant) -> Slot:
        """A slot with no reuse (for a sibling that will copy its KV from another slot)."""
        slot = self._free_slot()
        if slot is None:
            raise RuntimeError("no free slot to reserve")
        return self._assign(slot, seq, 0).slot

    def _take(self, slot: Slot, seq: Occupant, keep: int) -> Placement:
        if not self.memory.seq_rm(slot.seq_id, keep, -1):
            # Some memories (recurrent, sliding-window) cannot drop a suffix: start over.
            self.memory.seq_rm(slot.seq_id, -1, -1)
            keep = 0
        return self._assign(slot, seq, keep)

    def _assign(self, slot: Slot, seq: Occupant, reused: int) -> Placement:
        if slot.pin is not None:  # its session's next turn runs here; released, it pins again
            del self.pins[slot.pin]
            slot.pin = None
        slot.owner, slot.cached, slot.adapters = seq, [], seq.request.adapters
        if reused:
            self.hits += 1
            self.reused_tokens += reused
        return Placement(slot, reused)

    def _busy_bounds(self) -> tuple[int, int] | None:
        """The lowest and highest busy sequence ids; None when none is busy."""
        busy = [s.seq_id for s in self.slots if s.busy]
        return (busy[0], busy[-1]) if busy else None

    def _layout(self, slot: Slot, bounds: tuple[int, int] | None) -> tuple[int, int]:
        """What making `slot` busy does to the layout of busy ids, smaller is better: how many
        more runs of consecutive ids there are (1 alone, 0 beside one busy neighbour, -1 when
        it joins two runs), then the span from the lowest busy id to the highest. Always
        (0, 0) unless packed."""
        if not self.packed:
            return (0, 0)
        i = slot.seq_id
        left = i > 0 and self.slots[i - 1].busy
        right = i + 1 < len(self.slots) and self.slots[i + 1].busy
        span = 1 if bounds is None else max(bounds[1], i) - min(bounds[0], i) + 1
        return (1 - left - right, span)

    def _pick_free(self) -> Slot | None:
        """The slot a new sequence should use: packed, the one that adds fewest runs and then
        widens the busy span least; then an empty slot before an idle one, and the least
        recently used idle one first. Pinned slots are never picked."""
        free = [s for s in self.slots if not s.busy and s.pin is None]
        if not free:
            return None
        bounds = self._busy_bounds()
        return min(free, key=lambda s: (self._layout(s, bounds), bool(s.cached),
                                        s.last_used if s.cached else 0.0, s.seq_id))

    def _free_slot(self) -> Slot | None:
        """`_pick_free`'s slot, its resident KV evicted."""
        slot = self._pick_free()
        if slot is not None:
            self._clear(slot)
        return slot

    def _clear(self, slot: Slot) -> None:
        if slot.cached:
            self.evict(slot)

    def evict(self, slot: Slot) -> None:
        if slot.pin is not None:
            del self.pins[slot.pin]
            slot.pin = None
            self.pins_dropped += 1
        self.memory.seq_rm(slot.seq_id, -1, -1)
        slot.cached = []

    def evict_lru_idle(self) -> bool:
        """The KV pool is full: evict the least recently used idle prefix, a session's pinned
        one only when no other is left."""
        idle = [s for s in self.slots if not s.busy and s.cached]
        if not idle:
            return False
        self.evict(min(idle, key=lambda s: (s.pin is not None, s.last_used)))
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
            if owner.request.pin is not None:
                self._pin(slot, owner.request.pin)
            self._enforce_budget(newest=slot)
        else:
            self.evict(slot)

    def _pin(self, slot: Slot, key: str) -> None:
        """Hold `slot` for session `key` (instead of the slot its last turn left, if another),
        unpinning the least recently used sessions to stay within the pin budget."""
        self._unpin(key)
        size = len(slot.cached)
        if self.max_pinned < 1 or not slot.cached or (
                self.pin_tokens is not None and size > self.pin_tokens):
            return
        older = sorted(self.pins.values(), key=lambda s: s.last_used)
        while older and (len(older) >= self.max_pinned or (
                self.pin_tokens is not None
                and sum(len(s.cached) for s in older) + size > self.pin_tokens)):
            victim = older.pop(0)
            self._unpin(victim.pin or "")
            self.pins_dropped += 1
        slot.pin = key
        self.pins[key] = slot

    def unpin(self, key: str) -> bool:
        """End session `key`'s pin: its KV stays as ordinary idle cache (LRU, idle budget)."""
        if not self._unpin(key):
            return False
        idle = [s for s in self.slots if not s.busy and s.cached and s.pin is None]
        self._enforce_budget(newest=max(idle, key=lambda s: s.last_used) if idle else None)
        return True

    def _unpin(self, key: str) -> bool:
        slot = self.pins.pop(key, None)
        if slot is None:
            return False
        slot.pin = None
        return True

    def _enforce_budget(self, newest: Slot | None) -> None:
        if self.idle_tokens is None:
            return
        budget = self.idle_tokens
        others = sorted((s for s in self.slots
                         if not s.busy and s.cached and s is not newest and s.pin is None),
                        key=lambda s: s.last_used)
        excess = sum(len(s.cached) for s in others) - budget
        for victim in others:
            if excess <= 0:
                break
            excess -= len(victim.cached)
            self.evict(victim)

    def flush(self) -> int:
        """Drop every idle slot's KV (the prefix cache) but the sessions' pinned ones; returns
        how many were dropped."""
        dropped = 0
        for slot in self.slots:
            if not slot.busy and slot.cached and slot.pin is None:
                self.evict(slot)
                dropped += 1
        return dropped
