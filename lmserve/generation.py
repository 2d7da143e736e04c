"""ParsedGeneration: an engine generation whose outputs come out as the backend contract's
choice steps, each choice's text already through its own chat parser (reasoning, tool calls)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

from lmserve.chat.tools import StreamParser
from lmserve.chat.turn import step_events, turn_over
from lmserve.core.backend import ChoiceStep, choice_step
from lmserve.core.events import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, TokenOutput
from lmserve.engine.client import Generation

ParserFactory = Callable[[], StreamParser]


class ParsedGeneration:
    """Iterate for lists of `ChoiceStep`s, one list per engine step. With a parser factory,
    each choice gets a fresh parser and its steps carry the parsed events; without one, the
    text is the output channel as it is."""

    def __init__(self, generation: Generation, new_parser: ParserFactory | None = None) -> None:
        self.generation = generation
        self.new_parser = new_parser
        self._parsers: dict[int, StreamParser] = {}
        self._stopping: set[int] = set()  # choices asked to stop where their turn ended

    @property
    def request_id(self) -> str:
        return self.generation.request.request_id

    @property
    def n(self) -> int:
        return self.generation.request.n

    @property
    def finished(self) -> bool:
        return self.generation.closed or self.generation.request.finished

    @property
    def closed(self) -> bool:
        return self.generation.closed

    async def ready(self) -> None:
        """The engine accepted the request when it was submitted (refusals raise there)."""

    async def __aiter__(self) -> AsyncIterator[list[ChoiceStep]]:
        async for outputs in self.generation:
            yield [self._step(out) for out in outputs]

    def _step(self, out: TokenOutput) -> ChoiceStep:
        if self.new_parser is None:
            return choice_step(out)
        parser = self._parsers.get(out.index)
        if parser is None:
            parser = self._parsers[out.index] = self.new_parser()
        # A failed choice's held-back text is dropped with it: nothing half-parsed leaks.
        finished = out.finished and out.finish_reason != FINISH_ERROR
        events = step_events(parser, out.text, finished)
        if turn_over(parser):  # the parser ended the turn (a repeated call): so does the choice
            if not out.finished and out.index not in self._stopping:
                self._stopping.add(out.index)
                self.generation.stop_choice(out.index)
            elif out.finish_reason == FINISH_LENGTH:  # the limit came after the turn's end
                out = dataclasses.replace(out, finish_reason=FINISH_STOP)
        return choice_step(out, events)

    def close(self) -> None:
        self.generation.close()
