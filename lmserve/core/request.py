"""What a dialect asks the engine for, with no trace of any wire format."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lmserve.core.errors import LmserveError, invalid
from lmserve.core.images import ImageInput
from lmserve.core.lora import LoraSelection


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

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def check(self, name: FieldNames) -> None:
        """Refuse values that make no sense, naming the field as the dialect spells it."""
        for key in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty"):
            value = getattr(self, key)
            if not math.isfinite(value):
                _refuse(name, key, "must be a finite number", value)
        if self.temperature < 0:
            _refuse(name, "temperature", "must be 0 (greedy) or more", self.temperature)
        if not 0 < self.top_p <= 1:
            _refuse(name, "top_p", "must be above 0 and at most 1", self.top_p)
        if not 0 <= self.top_k <= TOP_K_MAX:
            _refuse(name, "top_k", f"must be between 0 (off) and {TOP_K_MAX}", self.top_k)
        if not 0 <= self.min_p <= 1:
            _refuse(name, "min_p", "must be between 0 and 1", self.min_p)
        low, high = REPETITION_PENALTY
        if not low <= self.repetition_penalty <= high:
            _refuse(name, "repetition_penalty", f"must be between {low} and {high:g} (1 is off)",
                    self.repetition_penalty)
        for key in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_MAX <= getattr(self, key) <= PENALTY_MAX:
                _refuse(name, key, f"must be between {-PENALTY_MAX:g} and {PENALTY_MAX:g}",
                        getattr(self, key))
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            _refuse(name, "seed", "must fit in 64 bits", self.seed)
        for token, bias in self.logit_bias.items():
            if token < 0:
                _refuse(name, "logit_bias", "keys must be token ids (0 or more)", token)
            if not (math.isfinite(bias) and abs(bias) <= LOGIT_BIAS_MAX):
                _refuse(name, "logit_bias",
                        f"values must be between {-LOGIT_BIAS_MAX:g} and {LOGIT_BIAS_MAX:g}", bias)


# Sampling values outside these bounds are refused in every dialect (SamplingParams.check).
TOP_K_MAX = 2**31 - 1  # llama.cpp's int32; any k at or above the vocabulary keeps every token
REPETITION_PENALTY = (0.01, 10.0)  # a divisor of repeated tokens' logits; llama.cpp's 1.1 is usual
PENALTY_MAX = 2.0  # presence and frequency penalties: OpenAI's and vLLM's [-2, 2]
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # signed or unsigned 64-bit
LOGIT_BIAS_MAX = 100.0  # OpenAI's [-100, 100]


@dataclass(frozen=True)
class FieldNames:
    """How a dialect spells the neutral request fields, for error messages and `param`: a
    prefix ("options.") and renames (repetition_penalty -> repeat_penalty)."""

    prefix: str = ""
    renames: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, key: str) -> str:
        return self.prefix + self.renames.get(key, key)


def _refuse(name: FieldNames, key: str, rule: str, value: Any) -> None:
    raise invalid(f"'{name(key)}' {rule}; got {value!r}", param=name(key), code="invalid_value")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # tool_calls, tool_call_id, ...
    images: tuple[ImageInput, ...] = ()  # checked and loaded by chat.media

    def as_template_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        message.update(self.extra)
        return message


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is the JSON Schema of its arguments."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool = False

    def as_template_dict(self) -> dict[str, Any]:
        """The OpenAI-style shape Hugging Face chat templates read."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


def function_tool(function: Mapping[str, Any], where: str) -> ToolSpec:
    """A ToolSpec from a function definition {"name", "description"?, "parameters"?};
    `where` names it in errors (e.g. "tools[0].function")."""
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name is required", param=f"{where}.name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise invalid(f"{where}.parameters must be a JSON Schema object",
                      param=f"{where}.parameters")
    description = function.get("description")
    return ToolSpec(name=name, description=description if isinstance(description, str) else None,
                    parameters=dict(parameters) if parameters is not None else None,
                    strict=bool(function.get("strict")))


@dataclass(frozen=True)
class NamedTool:
    """tool_choice that forces one call of this function."""

    name: str


# "auto": the model may call tools; "none": no tools are offered; "required": at least one call.
ToolChoice = Literal["auto", "none", "required"] | NamedTool


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: the whole answer must match.

    type "json_object" (any JSON object), "json_schema" (`schema`), "regex" (`pattern`, matched
    in full) or "gbnf" (`grammar`, raw llama.cpp GBNF with a root rule). `param` names the
    request field in the client's dialect, for error messages."""

    type: Literal["json_object", "json_schema", "regex", "gbnf"]
    schema: dict[str, Any] | bool | None = None
    pattern: str | None = None
    grammar: str | None = None
    strict: bool = False
    param: str = "response_format"


@dataclass
class GenerationRequest:
    """One generation: exactly one of messages, prompt or prompt_tokens is set. Sampling
    values that make no sense are refused when it is made, in every dialect."""

    def __post_init__(self) -> None:
        self.sampling.check(self.fields)

    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # How the dialect names these fields, for the refusal of a value that makes no sense.
    fields: FieldNames = field(default_factory=FieldNames)
    max_tokens: int | None = None  # None = up to the context limit
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    add_generation_prompt: bool = True
    # The reply continues the final assistant message (a prefill) instead of starting a turn
    # of its own (vLLM's continue_final_message; add_generation_prompt is then False).
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    logprobs: int | None = None  # None: off; k: each sampled token's logprob + top k alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    # The caller's stream reports the usage so far on every chunk (vLLM's
    # continuous_usage_stats): a backend that learns the counts elsewhere (an upstream) asks
    # for them as it goes (ChoiceStep.running).
    continuous_usage: bool = False
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning: bool | None = None  # enable thinking (template's enable_thinking); None: default
    # A chat that does not fit the context: refuse it, or drop its oldest turns (chat.overflow).
    context_overflow: Literal["error", "truncate"] | None = None  # None: the server's default
    # LoRA adapters by alias (core.lora); a "<model>:<alias>" model name selects one too.
    lora: LoraSelection | None = None
    # A session key (the dialect's, e.g. "sglang:<id>"): the KV this request leaves stays
    # pinned for the session's next turn, within the session budget, until
    # ModelBackend.release_session. None: ordinary prefix cache only.
    session: str | None = None
    # Admission: a lower priority is admitted earlier (vLLM's field; FIFO within one value);
    # waiting requests of different callers take turns. caller None: core.caller's current
    # caller (the HTTP layer sets it from the API key's name or the client's address).
    priority: int = 0
    caller: str | None = None
    # Seconds the model stays loaded once idle after this request (Ollama's keep_alive, in
    # every dialect that carries it): None: the model's default; 0: unload at once; < 0: never.
    keep_alive: float | None = None
    # The DEFAULTABLE fields whose value is decided (the caller set them, or the dialect always
    # decides them): a model's defaults never replace these (with_defaults). Each adapter
    # fills it from what the wire body set (explicit_fields).
    explicit: frozenset[str] = frozenset()


# -- a model's default generation parameters ------------------------------------------------

# The neutral fields a model's defaults may fill (the card's, under a resource view's; the
# names models.resource.check_params accepts): the sampling ones, then the request's own.
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty")
DEFAULTABLE = frozenset({*SAMPLING_DEFAULTS, "max_tokens", "stop", "reasoning",
                         "context_overflow"})
# Only a chat has a template that thinks and turns to drop: a raw prompt keeps these unset.
CHAT_ONLY_DEFAULTS = frozenset({"reasoning", "context_overflow"})
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty")


def explicit_fields(given: Mapping[str, Any],
                    names: Mapping[str, str] | None = None) -> frozenset[str]:
    """The DEFAULTABLE fields a wire body set: `given` holds the wire fields it carried with
    their values (a null one counts as unset), `names` the dialect's wire name -> neutral name
    where they differ (num_predict -> max_tokens, stop_sequences -> stop)."""
    renames = names or {}
    neutral = (renames.get(key, key) for key, value in given.items() if value is not None)
    return frozenset(name for name in neutral if name in DEFAULTABLE)


def with_defaults(request: GenerationRequest, defaults: Mapping[str, Any]) -> GenerationRequest:
    """The request with a model's default generation parameters (neutral names, see
    DEFAULTABLE; others are ignored) in the fields its caller left unset (not in
    `request.explicit`); a raw prompt takes no chat-only default. Precedence: the dialect's own
    default < `defaults` < the caller. A default that makes no sense is refused, saying so;
    the filled request's sampling values are checked again."""
    chat = request.messages is not None
    unset = {key: value for key, value in defaults.items()
             if key in DEFAULTABLE and value is not None and key not in request.explicit
             and (chat or key not in CHAT_ONLY_DEFAULTS)}
    if not unset:
        return request
    values = {key: _default_value(request.fields, key, value) for key, value in unset.items()}
    sampling = {key: values.pop(key) for key in SAMPLING_DEFAULTS if key in values}
    try:
        SamplingParams(**sampling).check(request.fields)
    except LmserveError as exc:
        raise invalid(f"the model's default {exc.message}; set it in the request to override "
                      "the default", param=exc.param, code=exc.code) from None
    # dataclasses.replace runs __post_init__: the whole sampling is checked again.
    return dataclasses.replace(request, sampling=request.sampling.replace(**sampling), **values)


def _default_value(name: FieldNames, key: str, value: Any) -> Any:
    """One default in the request's types (a stop string becomes a list), or a refusal."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in _FLOATS and number:
        return float(value)
    if key in ("top_k", "seed") and number and isinstance(value, int):
        return value
    if key == "max_tokens" and number and isinstance(value, int) and value >= 1:
        return value
    if key == "stop" and isinstance(value, str):
        return [value] if value else []
    if key == "stop" and isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    if key == "reasoning" and isinstance(value, bool):
        return value
    if key == "context_overflow" and value in ("error", "truncate"):
        return value
    raise invalid(f"the model's default '{name(key)}' has a value that does not fit it: "
                  f"{value!r}; set it in the request to override the default",
                  param=name(key), code="invalid_value")
