"""What a dialect asks the engine for, with no trace of any wire format."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF with a `root` rule: constrains every sampled token

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # tool_calls, tool_call_id, ...

    def as_template_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        message.update(self.extra)
        return message


@dataclass
class GenerationRequest:
    """One generation: exactly one of messages, prompt or prompt_tokens is set."""

    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None = up to the context limit
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    add_generation_prompt: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
