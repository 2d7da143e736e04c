"""Neutral outputs of a generation, consumed by the dialect encoders."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
