"""Neutral outputs of a generation, consumed by the dialect encoders."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.core.errors import ErrorKind


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FINISH_STOP = "stop"  # EOS/EOT or a stop string / stop token
FINISH_LENGTH = "length"  # max_tokens or the context limit
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One alternative at a position: `piece` is the token's bytes (a control token's text)."""

    token_id: int
    piece: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution, with the `top` most
    likely alternatives at that position, most likely first. `logprob` is None only for the
    first prompt token, which nothing precedes."""

    token_id: int
    piece: bytes
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


@dataclass
class TokenOutput:
    """What one sequence produced in one engine step (text may be empty while held back)."""

    index: int  # which of the n choices
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_match: str | None = None  # the stop string or token text that ended it
    usage: Usage | None = None  # set on the final output
    error: str | None = None
    error_kind: ErrorKind | None = None  # with FINISH_ERROR: the status class of the failure
    # One entry per token in token_ids, when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None
    # On a choice's first output, when the request asked for prompt logprobs: one entry per
    # prompt token (the first with logprob None).
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# --- Parsed chat output: what the reasoning and tool-call parsers make of the text -------------

CHANNEL_OUTPUT = "output"
CHANNEL_REASONING = "reasoning"


@dataclass(frozen=True)
class TextDelta:
    """A piece of text on one channel: "output" (the answer) or "reasoning"."""

    channel: str
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """The first event of a tool call: `index` counts calls within the turn, from 0."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a call's arguments JSON text; the fragments concatenate to the whole."""

    index: int
    arguments: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The last event of a call. `arguments` equals the concatenated deltas; `complete` is False
    when the output stopped or broke off inside the call (the arguments may then be cut short)."""

    index: int
    arguments: str
    complete: bool = True


ChatEvent = TextDelta | ToolCallStart | ToolCallDelta | ToolCallEnd


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text
    complete: bool = True


@dataclass
class ParsedTurn:
    """Accumulates chat events into a whole assistant turn (for non-streaming responses)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    _open: dict[int, ToolCallStart] = field(default_factory=dict, repr=False)

    def add(self, event: ChatEvent) -> None:
        if isinstance(event, TextDelta):
            if event.channel == CHANNEL_REASONING:
                self.reasoning += event.text
            else:
                self.content += event.text
        elif isinstance(event, ToolCallStart):
            self._open[event.index] = event
        elif isinstance(event, ToolCallEnd):
            start = self._open.pop(event.index)
            self.tool_calls.append(ToolCall(start.id, start.name, event.arguments, event.complete))

    def extend(self, events: list[ChatEvent]) -> ParsedTurn:
        for event in events:
            self.add(event)
        return self
