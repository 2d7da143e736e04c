"""/tokenize and /detokenize as vLLM serves them beside its OpenAI routes (llama-server's field
names are read too), so clients and an lmserve in front of this one (`--upstream`) can count
and read a model's tokens. Pure: the routes (dialects.openai.routes) pick the model.

POST /tokenize {model?, prompt | content, add_special_tokens | add_special, return_token_strs}
-> {count, max_model_len, tokens[, token_strs]}; vLLM's chat form {model?, messages, tools?,
tool_choice?, chat_template_kwargs?, add_generation_prompt, continue_final_message} renders the
messages as /v1/chat/completions would (chat_request) and tokenizes that prompt; POST
/detokenize {model?, tokens} ->
{prompt, content} (vLLM's and llama-server's key for the same text). Without `model` the
server's only model answers. Special tokens are added by default for `prompt` (vLLM's default)
and not for `content` (llama-server's)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lmserve.core.backend import ModelBackend, PreparedPrompt
from lmserve.core.errors import invalid, unsupported
from lmserve.core.request import GenerationRequest
from lmserve.dialects.openai import adapter
from lmserve.dialects.openai.schema import ChatCompletionRequest, ChatMessageIn


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: ignored and named (http.fields)


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None  # vLLM's
    content: str | None = None  # llama-server's
    add_special_tokens: bool | None = None  # vLLM's (default true)
    add_special: bool | None = None  # llama-server's (default false)
    return_token_strs: bool = False  # vLLM's: each token's text too
    with_pieces: bool = False  # llama-server's pieces: refused
    # vLLM's chat form: the messages rendered as the chat route renders them
    messages: list[ChatMessageIn] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def chat_request(body: TokenizeRequest) -> GenerationRequest | None:
    """The chat form's request, as /v1/chat/completions builds it; None for a text."""
    if body.messages is None:
        return None
    if body.prompt is not None or body.content is not None:
        raise invalid("send messages or a prompt, not both", param="messages",
                      code="invalid_value")
    if not body.messages:
        raise invalid("messages must not be empty", param="messages", code="invalid_value")
    return adapter.chat_request(ChatCompletionRequest(
        model=body.model or "", messages=body.messages, tools=body.tools,
        tool_choice=body.tool_choice, chat_template_kwargs=body.chat_template_kwargs,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message))


def tokenize(service: ModelBackend, body: TokenizeRequest,
             chat: PreparedPrompt | None = None) -> dict[str, Any]:
    """`chat`: the chat form's prompt, prepared (and counted, for an upstream) by the
    route."""
    if body.with_pieces:
        raise unsupported("with_pieces", "token pieces are not supported; send "
                          "return_token_strs")
    card = service.require_ready()
    if chat is not None:
        if not chat.tokens:
            raise unsupported("messages", "this model's chat is rendered by its upstream, "
                              "which does not count it; send the text as prompt")
        tokens = chat.tokens
    else:
        text, add_special = _text(body)
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
