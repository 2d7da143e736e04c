"""LoRA adapters on the engine side: loading them, and one adapter group per decode step.

llama.cpp applies adapters to a whole context, not to a sequence, so every sequence in one
llama_decode runs under the same adapter set. The scheduler therefore decodes one group
(sequences with equal sets) per step and rotates between the groups that have work.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from lmserve.core.lora import AdapterSet, LoraSpec, check_file

if TYPE_CHECKING:
    from lmserve.engine.sequence import Sequence


class AdapterTarget(Protocol):
    def set_adapters(self, adapters: AdapterSet) -> None: ...


class LoraLoader(Protocol):
    def load_lora(self, path: str) -> None: ...


def load_adapters(model: LoraLoader, specs: Iterable[LoraSpec]) -> None:
    """Load every configured adapter into the model; a missing or unfit file fails the load."""
    for spec in specs:
        check_file(spec)
        try:
            model.load_lora(spec.path)
        except RuntimeError as exc:
            raise RuntimeError(f"LoRA adapter '{spec.alias}': {exc}") from None


# Changing a context's adapters makes llama.cpp re-plan its compute graph: about 4 ms on
# SmolLM2-135M here, against a 10-14 ms single-token decode. A group therefore keeps the
# context for a few steps before the next group's turn.
STEPS_PER_TURN = 4


class AdapterRotation:
    """Chooses each step's adapter group. The current group keeps its turn for up to
    `steps_per_turn` steps while it has work; then the group served least recently among the
    others with work goes next, so busy groups take turns and a new group waits at most one
    turn."""

    def __init__(self, steps_per_turn: int = STEPS_PER_TURN) -> None:
        self.steps_per_turn = steps_per_turn
        self.active: AdapterSet = ()  # what the context has applied now
        self.chosen: AdapterSet = ()  # the group of the step being planned
        self.switches = 0
        self.steps: Counter[AdapterSet] = Counter()  # decode steps per group (metrics)
        self._last_served: dict[AdapterSet, int] = {}
        self._clock = 0
        self._turn = 0  # steps the active group has had in a row

    def select(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences of this step's group (all of them when only one group has work)."""
        groups = list(dict.fromkeys(s.request.adapters for s in seqs))
        if not groups:
            return seqs
        # Forget groups that left, so the table stays as small as the set of busy groups.
        self._last_served = {g: self._last_served.get(g, -1) for g in groups}
        if self.active not in groups or self._turn >= self.steps_per_turn:
            others = [g for g in groups if g != self.active] or groups
            self.chosen = min(others, key=lambda g: self._last_served[g])
        else:
            self.chosen = self.active
        if len(groups) == 1:
            return seqs
        return [s for s in seqs if s.request.adapters == self.chosen]

    def apply(self, runner: AdapterTarget) -> None:
        """Right before the decode: switch the context's adapters if the group changed."""
        if self.chosen != self.active:
            runner.set_adapters(self.chosen)
            self.active, self._turn = self.chosen, 0
            self.switches += 1
        self._turn += 1
        self._clock += 1
        self._last_served[self.chosen] = self._clock
        self.steps[self.chosen] += 1
