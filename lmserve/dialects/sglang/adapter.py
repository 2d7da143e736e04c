"""Pure translation: an SGLang /generate body -> one GenerationRequest per prompt."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from lmserve.core.errors import invalid, unsupported
from lmserve.core.lora import selection_field
from lmserve.core.request import FieldNames, GenerationRequest, ResponseFormat
from lmserve.core.request import SamplingParams as CoreSampling
from lmserve.dialects.given import explicit
from lmserve.dialects.sglang.encoder import LogprobShape
from lmserve.dialects.sglang.schema import GenerateRequest, SamplingParams

T = TypeVar("T")
GREEDY_BELOW = 1e-6  # SGLang samples greedily under this temperature

MAX_TOP_LOGPROBS = 20  # alternatives per position, the cap the OpenAI endpoints have too
_LATER = {"custom_logit_processor": "custom logit processors are not supported",
          "return_hidden_states": "hidden states are not returned by this server",
          "image_data": "this server takes text input only",
          "audio_data": "this server takes text input only",
          "video_data": "this server takes text input only",
          "input_embeds": "send text or input_ids"}
_CONSTRAINTS = ("json_schema", "regex", "ebnf")  # at most one, as in SGLang


@dataclass(frozen=True)
class Job:
    """One prompt of the request: its engine request id (the rid) and how to report it."""

    rid: str
    request: GenerationRequest
    stream_interval: int = 1
    no_stop_trim: bool = False
    logprobs: LogprobShape | None = None


@dataclass(frozen=True)
class GeneratePlan:
    jobs: list[Job]
    listed: bool  # answer with a list: batch input, or n > 1 samples

    @property
    def offsets(self) -> list[int]:
        """Where each job's first sample sits in the flat output list."""
        out, at = [], 0
        for job in self.jobs:
            out.append(at)
            at += job.request.n
        return out


def generate_plan(body: GenerateRequest, new_rid: Callable[[], str]) -> GeneratePlan:
    refuse_unsupported(body)
    prompts, batch = _prompts(body)
    params = [_sampling_params(p, i if isinstance(body.sampling_params, list) else None)
              for i, p in enumerate(_per_prompt(body.sampling_params, len(prompts),
                                                "sampling_params") or [{}] * len(prompts))]
    rids = _rids(body.rid, len(prompts), batch, new_rid)
    logprobs = _logprob_plans(body, len(prompts))
    loras: list[str | None] = (_per_prompt(body.lora_path, len(prompts), "lora_path")
                               or [None] * len(prompts))
    jobs = [_job(prompt, p, rid, body.model, lp, lora)
            for prompt, p, rid, lp, lora in zip(prompts, params, rids, logprobs, loras,
                                                strict=True)]
    for job in jobs:
        job.request.priority = body.priority
    return GeneratePlan(jobs, listed=batch or any(j.request.n > 1 for j in jobs))


def refuse_unsupported(body: GenerateRequest) -> None:
    for name, detail in _LATER.items():
        value = getattr(body, name)
        if any(v not in (None, False) for v in _as_list(value)):
            raise unsupported(name, detail)
    if body.token_ids_logprob is not None:
        raise unsupported("token_ids_logprob", "logprobs of chosen token ids are not returned; "
                          "use top_logprobs_num")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _logprob_plans(body: GenerateRequest, n: int) -> list[LogprobShape | None]:
    wanted = _per_prompt(body.return_logprob, n, "return_logprob") or [False] * n
    given_tops = _per_prompt(body.top_logprobs_num, n, "top_logprobs_num")
    given_starts = _per_prompt(body.logprob_start_len, n, "logprob_start_len")
    tops: Sequence[int | None] = given_tops or [None] * n
    starts: Sequence[int | None] = given_starts or [None] * n
    return [_logprob_plan(bool(w), t, s, body.return_text_in_logprobs)
            for w, t, s in zip(wanted, tops, starts, strict=True)]


def _logprob_plan(wanted: bool, top: int | None, start: int | None,
                  text: bool) -> LogprobShape | None:
    top, start = top or 0, -1 if start is None else start
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid(f"top_logprobs_num must be between 0 and {MAX_TOP_LOGPROBS}",
                      param="top_logprobs_num")
    if start < -1:
        raise invalid("logprob_start_len must be -1 (output tokens only) or a prompt position",
                      param="logprob_start_len")
    if not wanted:
        for name, value, neutral in (("top_logprobs_num", top, 0),
                                     ("logprob_start_len", start, -1)):
            if value != neutral:
                raise invalid(f"{name} needs return_logprob to be true", param=name)
        return None
    return LogprobShape(top=top, start=start, text=text)


def _prompts(body: GenerateRequest) -> tuple[list[str | list[int]], bool]:
    if body.text is not None and body.input_ids is not None:
        raise invalid("send either text or input_ids, not both", param="input_ids")
    if body.text is None and body.input_ids is None:
        raise invalid("send text or input_ids", param="text", code="missing_required_parameter")
    if isinstance(body.text, str):
        return [body.text], False
    if body.text is not None:
        return _non_empty(list(body.text), "text"), True
    ids = body.input_ids or []
    if not ids:
        raise invalid("input_ids must not be empty", param="input_ids")
    # The schema admits a list of ids or a list of such lists, never a mix of the two.
    flat = [t for t in ids if isinstance(t, int)]
    if len(flat) == len(ids):
        return [flat], False
    batch: list[str | list[int]] = [list(p) for p in ids if not isinstance(p, int)]
    for i, p in enumerate(batch):
        if not p:
            raise invalid(f"input_ids[{i}] is empty", param=f"input_ids[{i}]")
    return _non_empty(batch, "input_ids"), True


def _non_empty(items: list[T], name: str) -> list[T]:
    if not items:
        raise invalid(f"{name} must not be an empty list", param=name)
    return items


def _per_prompt(value: T | list[T] | None, n: int, name: str) -> list[T] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise invalid(f"{name} has {len(value)} entries for {n} prompts; send one per prompt "
                      "or a single one for all", param=name)
    return value


def _sampling_params(raw: dict[str, Any], index: int | None) -> SamplingParams:
    where = "sampling_params" if index is None else f"sampling_params[{index}]"
    try:
        return SamplingParams.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                for p in first["loc"])
        raise invalid(f"invalid value for '{param}': {first['msg']}", param=param) from None


def _rids(rid: str | list[str] | None, n: int, batch: bool,
          new_rid: Callable[[], str]) -> list[str]:
    if rid is None:
        return [new_rid() for _ in range(n)]
    if isinstance(rid, str):
        if batch:
            raise invalid("for a batch, rid must be a list with one id per prompt", param="rid")
        rids = [rid]
    else:
        rids = _per_prompt(rid, n, "rid") or []
    if any(not r for r in rids):
        raise invalid("rid must be a non-empty string", param="rid")
    if len(set(rids)) != len(rids):
        raise invalid("rid values must be unique within a request", param="rid")
    return rids


def _job(prompt: str | list[int], params: SamplingParams, rid: str, model: str | None,
         logprobs: LogprobShape | None, lora: str | None = None) -> Job:
    _refuse_sampling(params)
    return Job(rid=rid, request=GenerationRequest(
        model=model,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_tokens=prompt if isinstance(prompt, list) else None,
        sampling=sampling(params), fields=FIELDS,
        max_tokens=params.max_new_tokens,
        stop=[s for s in params.stop or [] if s],
        stop_token_ids=list(params.stop_token_ids or []),
        ignore_eos=params.ignore_eos,
        n=params.n,
        request_id=rid,
        logprobs=logprobs.top if logprobs else None,
        prompt_logprobs=logprobs.top if logprobs and logprobs.start >= 0 else None,
        response_format=response_format(params),
        lora=selection_field(lora, "lora_path"),
        explicit=explicit(params, _NAMES),
    ), stream_interval=params.stream_interval or 1, no_stop_trim=params.no_stop_trim,
        logprobs=logprobs)


def _refuse_sampling(params: SamplingParams) -> None:
    if params.structural_tag is not None:
        raise unsupported("sampling_params.structural_tag", "use json_schema, regex or ebnf")
    if params.stop_regex is not None:
        raise unsupported("sampling_params.stop_regex", "stop on strings (stop) or token ids "
                          "(stop_token_ids)")
    if params.max_new_tokens == 0:
        raise unsupported("sampling_params.max_new_tokens",
                          "scoring a prompt without generating is not supported; ask for at "
                          "least 1 token (return_logprob with logprob_start_len still scores "
                          "the prompt)")
    if params.min_new_tokens:
        raise unsupported("sampling_params.min_new_tokens", "a minimum length is not supported")
    if not params.skip_special_tokens:
        raise unsupported("sampling_params.skip_special_tokens",
                          "special tokens are always left out of text (output_ids has them)")
    if params.custom_params:
        raise unsupported("sampling_params.custom_params", "custom logit processors are not "
                          "supported")


def response_format(params: SamplingParams) -> ResponseFormat | None:
    """json_schema (JSON text or an object), regex or ebnf (taken as llama.cpp GBNF)."""
    given = [name for name in _CONSTRAINTS if getattr(params, name) is not None]
    if len(given) > 1:
        raise invalid(f"only one of json_schema, regex and ebnf can be set, got {given}",
                      param=f"sampling_params.{given[1]}")
    if not given:
        return None
    name = given[0]
    param = f"sampling_params.{name}"
    if name == "regex":
        return ResponseFormat("regex", pattern=params.regex, param=param)
    if name == "ebnf":
        return ResponseFormat("gbnf", grammar=params.ebnf, param=param)
    return ResponseFormat("json_schema", schema=_schema(params.json_schema), param=param)


def _schema(raw: str | dict[str, Any] | None) -> dict[str, Any] | bool:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise invalid(f"sampling_params.json_schema is not valid JSON: {exc}",
                          param="sampling_params.json_schema") from None
    if not isinstance(raw, (dict, bool)):
        raise invalid("sampling_params.json_schema must be a JSON Schema object",
                      param="sampling_params.json_schema")
    return raw


# SGLang's names of the neutral fields, for errors, and the other way round.
FIELDS = FieldNames("sampling_params.", {"seed": "sampling_seed", "max_tokens": "max_new_tokens"})
_NAMES = {"sampling_seed": "seed", "max_new_tokens": "max_tokens"}


def sampling(params: SamplingParams) -> CoreSampling:
    return CoreSampling(
        temperature=0.0 if params.temperature < GREEDY_BELOW else params.temperature,
        top_p=params.top_p,
        top_k=0 if params.top_k == -1 else params.top_k,
        min_p=params.min_p,
        seed=params.sampling_seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=_logit_bias(params.logit_bias or {}),
    )


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}",
                          param="sampling_params.logit_bias") from None
    return out
