"""/tokenize and /detokenize as vLLM serves them beside its OpenAI routes (llama-server's field
names are read too), so clients and an lmserve in front of this one (`--upstream`) can count
and read a model's tokens. Pure: the routes (dialects.openai.routes) pick the model.

POST /tokenize {model?, prompt | content, add_special_tokens | add_special, return_token_strs}
-> {count, max_model_len, tokens[, token_strs]}; POST /detokenize {model?, tokens} ->
{prompt, content} (vLLM's and llama-server's key for the same text). Without `model` the
server's only model answers. Special tokens are added by default for `prompt` (vLLM's default)
and not for `content` (llama-server's)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lmserve.core.backend import ModelBackend
from lmserve.core.errors import invalid, unsupported


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: ignored and named (http.fields)


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None  # vLLM's
    content: str | None = None  # llama-server's
    add_special_tokens: bool | None = None  # vLLM's (default true)
    add_special: bool | None = None  # llama-server's (default false)
    return_token_strs: bool = False  # vLLM's: each token's text too
    messages: list[Any] | None = None  # vLLM's chat form: refused
    with_pieces: bool = False  # llama-server's pieces: refused


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def tokenize(service: ModelBackend, body: TokenizeRequest) -> dict[str, Any]:
    if body.messages is not None:
        raise unsupported("messages", "tokenizing a chat is not supported; send the text as "
                          "prompt")
    if body.with_pieces:
        raise unsupported("with_pieces", "token pieces are not supported; send "
                          "return_token_strs")
    text, add_special = _text(body)
    card = service.require_ready()
    tokens = service.tokenize(text, add_special=add_special)
    answer: dict[str, Any] = {"count": len(tokens), "max_model_len": card.n_ctx,
                              "tokens": tokens}
    if body.return_token_strs:
        answer["token_strs"] = [service.detokenize([t]) for t in tokens]
    return answer


def detokenize(service: ModelBackend, body: DetokenizeRequest) -> dict[str, Any]:
    weights = service.require_ready().weights
    n_vocab = weights.n_vocab if weights is not None else None
    if n_vocab is not None:
        bad = [t for t in body.tokens if t >= n_vocab]
        if bad:  # llama.cpp reads an id outside the vocabulary out of bounds
            raise invalid(f"tokens holds ids outside the vocabulary (0..{n_vocab - 1}): "
                          f"{bad[:5]}", param="tokens", code="invalid_value")
    text = service.detokenize(body.tokens)
    return {"prompt": text, "content": text}


def _text(body: TokenizeRequest) -> tuple[str, bool]:
    """The text and whether special tokens are added, by vLLM's or llama-server's names."""
    if body.prompt is not None and body.content is not None and body.prompt != body.content:
        raise invalid("send the text as prompt or as content, not two different texts",
                      param="content", code="invalid_value")
    if body.prompt is not None:
        text, default = body.prompt, True
    elif body.content is not None:
        text, default = body.content, False
    else:
        raise invalid("prompt (or content) is required", param="prompt",
                      code="missing_required_parameter")
    given = [v for v in (body.add_special_tokens, body.add_special) if v is not None]
    if len(set(given)) > 1:
        raise invalid("add_special_tokens and add_special disagree", param="add_special",
                      code="invalid_value")
    return text, given[0] if given else default
