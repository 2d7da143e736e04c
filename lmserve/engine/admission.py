"""The engine's wait queue: the order in which waiting sequences are admitted.

Order: a request's `priority` first (lower is served earlier, as vLLM takes it), then a fair
share between callers, then arrival. Fairness is start-time fair queuing with equal weights:
each request gets a tag one past the larger of the queue's virtual time (the tag of the last
request admitted) and its caller's previous tag. A caller with a hundred requests waiting
holds tags V+1 ... V+100, and another caller's one request arriving later gets V'+1, so it
is admitted next: callers that wait are served in turns, one request each, and a caller
alone is served first come, first served. Requests with no caller share one class (None).

A preempted sequence goes back to the front, ahead of every priority, since it already held
a slot. The queue also counts the prompt tokens of the requests that have left it (admitted
for the first time, or finished while waiting), which the client subtracts from what it
submitted to know the tokens waiting (`--max-queued-tokens`) without sharing a counter
across threads.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator

from lmserve.engine.sequence import EngineRequest, Sequence

Key = tuple[float, int, int, int]  # (priority, fair tag, arrival number, choice index)

_PRUNE_CALLERS = 1024  # forget callers whose tag fell behind virtual time past this many


class WaitQueue:
    """Waiting sequences in admission order; a list-like view (index, delete, iterate)."""

    def __init__(self) -> None:
        self._keys: list[Key] = []
        self._seqs: list[Sequence] = []
        self._tags: dict[str | None, int] = {}  # caller -> the tag of its latest request
        self._virtual = 0  # the tag of the latest request admitted
        self._arrivals = itertools.count()
        self._front = itertools.count(1)
        self.left_tokens = 0  # prompt tokens of the requests that left the queue (cumulative)

    def __len__(self) -> int:
        return len(self._seqs)

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(list(self._seqs))

    def __getitem__(self, i: int) -> Sequence:
        return self._seqs[i]

    def __delitem__(self, i: int) -> None:
        """Admit the sequence at i: it leaves the queue and virtual time moves to its tag."""
        key, seq = self._keys.pop(i), self._seqs.pop(i)
        if key[0] != -math.inf:
            self._virtual = max(self._virtual, key[1])
        self._left(seq)
        if len(self._tags) > _PRUNE_CALLERS:
            self._tags = {c: t for c, t in self._tags.items() if t > self._virtual}

    def add(self, request: EngineRequest) -> None:
        """Queue a request's sequences (its n choices, together) in their place."""
        caller = request.caller
        tag = max(self._virtual, self._tags.get(caller, 0)) + 1
        self._tags[caller] = tag
        arrival = next(self._arrivals)
        for seq in request.sequences:
            self._insert((request.priority, tag, arrival, seq.index), seq)

    def appendleft(self, seq: Sequence) -> None:
        """A preempted sequence: back to the front, before everything that waits."""
        self._insert((-math.inf, -next(self._front), 0, seq.index), seq)

    def remove(self, seq: Sequence) -> None:
        """A sequence that finishes while waiting (aborted, failed)."""
        i = self._seqs.index(seq)
        del self._keys[i], self._seqs[i]
        self._left(seq)

    def _insert(self, key: Key, seq: Sequence) -> None:
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._seqs.insert(i, seq)

    def _left(self, seq: Sequence) -> None:
        request = seq.request
        if not request.dequeued:
            request.dequeued = True
            self.left_tokens += len(request.prompt_tokens)
