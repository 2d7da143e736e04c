"""UpstreamBackend against a fake upstream (httpx.MockTransport): load, the card, streamed
generations, errors before and after the first byte, cancellation, stats, embeddings."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from lmserve.core.backend import (
    BackendGeneration,
    Failed,
    Finished,
    FinishReason,
    LoadState,
    ModelBackend,
    counted,
)
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TextDelta, Usage
from lmserve.core.request import ChatMessage, GenerationRequest, SamplingParams
from lmserve.upstream import UpstreamBackend, UpstreamSettings

URL = "http://upstream.test/v1"
MODELS = {"object": "list", "data": [{"id": "smol", "object": "model", "owned_by": "lmserve",
                                      "created": 123, "meta": {"n_ctx": 4096,
                                                               "architecture": "llama"}}]}


def sse(*chunks: Any) -> list[bytes]:
    return [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks]


def text_chunks(*pieces: str, reason: str = "stop") -> list[bytes]:
    chunks: list[Any] = [{"choices": [{"index": 0, "delta": {"role": "assistant",
                                                             "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens":
                                            len(pieces), "total_tokens": 9 + len(pieces)}})
    chunks.append("[DONE]")
    return sse(*chunks)


class Body(httpx.AsyncByteStream):
    """A streamed response body that can pause between chunks and records being closed."""

    def __init__(self, chunks: list[bytes], gate: asyncio.Event | None = None,
                 after: int = 0) -> None:
        self.chunks, self.gate, self.after = chunks, gate, after
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if self.gate is not None and i == self.after:
                await self.gate.wait()
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """The fake upstream: /v1/models, /tokenize (optional) and a scripted generation."""

    def __init__(self, *, tokenize: bool = False,
                 generate: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.tokenize = tokenize
        self.generate = generate or (lambda r: httpx.Response(
            200, stream=Body(text_chunks("Hel", "lo")),
            headers={"content-type": "text/event-stream"}))
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if path == "/tokenize":
            if not self.tokenize:
                return httpx.Response(404, json={"detail": "Not Found"})
            text = json.loads(request.content)["content"]
            return httpx.Response(200, json={"tokens": [ord(c) for c in text]})
        if path == "/detokenize" and self.tokenize:
            tokens = json.loads(request.content)["tokens"]
            return httpx.Response(200, json={"content": "".join(chr(t) for t in tokens)})
        if path == "/v1/embeddings":
            inputs = json.loads(request.content)["input"]
            return httpx.Response(200, json={"data": [
                {"index": i, "embedding": [float(i), 1.0]} for i in range(len(inputs))][::-1]})
        return self.generate(request)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith("completions")]


def backend(upstream: Upstream, **settings: Any) -> UpstreamBackend:
    b = UpstreamBackend("front", UpstreamSettings(URL, model="smol", **settings),
                        transport=httpx.MockTransport(upstream))
    b.load(asyncio.new_event_loop())
    return b


def chat_request(**kw: Any) -> GenerationRequest:
    kw.setdefault("sampling", SamplingParams(temperature=0.0))
    return GenerationRequest(model="front", messages=[ChatMessage("user", "hi")], **kw)


async def collect(generation: BackendGeneration) -> list[Any]:
    return [step async for steps in generation for step in steps]


def test_load_reads_the_model_list_into_the_card():
    b = backend(Upstream())
    assert isinstance(b, ModelBackend)
    card = b.card
    assert card.kind == "upstream" and card.source == URL and card.state == LoadState.READY
    assert card.n_ctx == 4096 and card.created == 123 and card.upstream_model == "smol"
    assert card.weights is not None and card.weights.architecture == "llama"
    assert card.has_template and card.ready
    assert "api_key" not in json.dumps(card.settings).replace('"api_key": null', "")


def test_a_model_the_upstream_does_not_serve_fails_the_load_with_the_reason():
    b = UpstreamBackend("front", UpstreamSettings(URL, model="nope"),
                        transport=httpx.MockTransport(Upstream()))
    with pytest.raises(ValueError, match="it serves: smol"):
        b.load(asyncio.new_event_loop())
    assert b.card.state == LoadState.FAILED and "smol" in b.card.error
    with pytest.raises(LmserveError) as exc:
        b.require_ready()
    assert exc.value.kind == ErrorKind.UPSTREAM


def test_an_unreachable_upstream_fails_the_load():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = UpstreamBackend("front", UpstreamSettings(f"http://127.0.0.1:{port}/v1",
                                                  connect_timeout=2))
    with pytest.raises(httpx.ConnectError):
        b.load(asyncio.new_event_loop())
    assert b.card.state == LoadState.FAILED and "ConnectError" in b.card.error
    assert not b.healthy


def test_tokenize_goes_to_the_upstream_or_is_unsupported():
    assert backend(Upstream(tokenize=True)).tokenize("abc") == [97, 98, 99]
    assert backend(Upstream(tokenize=True)).detokenize([97, 98]) == "ab"
    with pytest.raises(LmserveError) as exc:
        backend(Upstream()).tokenize("abc")
    assert exc.value.kind == ErrorKind.UNSUPPORTED and "/tokenize" in exc.value.message


def test_prepare_keeps_the_chat_for_the_upstream_to_render():
    prepared = backend(Upstream()).prepare(chat_request())
    assert prepared.tokens == [] and prepared.text is None


async def test_a_chat_streams_text_and_ends_with_the_upstream_usage():
    upstream = Upstream()
    b = backend(upstream, api_key="sk-up")
    gen = b.start(chat_request(max_tokens=5))
    steps = await collect(gen)
    assert "".join(s.text for s in steps) == "Hello" and gen.finished
    assert [e for s in steps for e in s.events] == [TextDelta("output", "Hel"),
                                                    TextDelta("output", "lo")]
    assert steps[-1].end == Finished(FinishReason.STOP, Usage(9, 2))
    [request] = [r for r in upstream.requests if r.url.path == "/v1/chat/completions"]
    assert request.headers["authorization"] == "Bearer sk-up"
    assert request.headers["x-request-id"] == gen.request_id
    body = json.loads(request.content)
    assert body["model"] == "smol" and body["stream"] is True and body["max_tokens"] == 5
    stats = b.stats()
    assert stats.active_requests == 0
    assert stats.upstream.requests == 1 and sum(stats.upstream.errors.values()) == 0
    assert stats.upstream.ttft_count == 1
    assert stats.counters["generated_tokens"] == 2


async def test_a_text_prompt_goes_to_completions():
    chunks = sse({"choices": [{"index": 0, "text": " Paris", "finish_reason": "length"}]},
                 {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
                 "[DONE]")
    upstream = Upstream(generate=lambda r: httpx.Response(200, stream=Body(chunks)))
    steps = await collect(backend(upstream).start(GenerationRequest(prompt="Capital:",
                                                                    max_tokens=1)))
    assert steps[0].text == " Paris" and steps[-1].end.reason == FinishReason.LENGTH
    assert upstream.requests[-1].url.path == "/v1/completions"


async def test_an_upstream_refusal_is_the_terminal_and_what_ready_raises():
    refusal = {"error": {"message": "this model's maximum context length is 4096 tokens",
                         "type": "invalid_request_error", "param": "max_tokens",
                         "code": "context_length_exceeded"}}
    b = backend(Upstream(generate=lambda r: httpx.Response(400, json=refusal)))
    gen = b.start(chat_request(max_tokens=100_000))
    with pytest.raises(LmserveError) as exc:
        await gen.ready()
    assert exc.value.kind == ErrorKind.CONTEXT_LENGTH_EXCEEDED
    assert exc.value.param == "max_tokens" and "4096" in exc.value.message
    [step] = await collect(gen)
    assert isinstance(step.end, Failed) and step.end.kind == ErrorKind.CONTEXT_LENGTH_EXCEEDED
    with pytest.raises(LmserveError) as raised:
        step.raise_failure()
    assert raised.value.kind.http_status == 400
    assert b.stats().upstream.errors["context_length_exceeded"] == 1


@pytest.mark.parametrize("exc, kind", [
    (httpx.ConnectError("connection refused"), ErrorKind.UPSTREAM),
    (httpx.ReadTimeout("timed out"), ErrorKind.UPSTREAM_TIMEOUT),
    (httpx.RemoteProtocolError("peer closed"), ErrorKind.UPSTREAM)])
async def test_connection_failures_are_502_and_timeouts_504(exc, kind):
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    gen = backend(Upstream(generate=fail)).start(chat_request(n=2))
    steps = await collect(gen)
    assert [s.index for s in steps] == [0, 1]  # every choice ends
    assert all(isinstance(s.end, Failed) and s.end.kind == kind for s in steps)
    assert kind.http_status in (502, 504)


async def test_a_stream_that_breaks_off_midway_fails_with_a_502():
    chunks = sse({"choices": [{"index": 0, "delta": {"content": "a"}}]})
    steps = await collect(backend(Upstream(
        generate=lambda r: httpx.Response(200, stream=Body(chunks)))).start(chat_request()))
    assert steps[0].text == "a"
    assert isinstance(steps[-1].end, Failed) and steps[-1].end.kind == ErrorKind.UPSTREAM


async def test_closing_the_generation_closes_the_upstream_stream():
    gate = asyncio.Event()
    body = Body(text_chunks("a", "b", "c"), gate, after=2)
    b = backend(Upstream(generate=lambda r: httpx.Response(200, stream=body)))
    gen = b.start(chat_request())
    seen = []
    async for steps in gen:
        seen.extend(steps)
        break  # the client went away after the first step
    assert not gen.finished
    gen.close()
    assert gen.finished
    for _ in range(50):
        if body.closed:
            break
        await asyncio.sleep(0.01)
    assert body.closed and b.stats().active_requests == 0
    assert seen[0].text == "a"


async def test_abort_by_id_ends_the_choices_as_cancelled():
    gate = asyncio.Event()
    body = Body(text_chunks("a", "b"), gate, after=2)
    b = backend(Upstream(generate=lambda r: httpx.Response(200, stream=body)))
    gen = b.start(chat_request(request_id="req-1"))
    steps = []
    async for out in gen:
        steps.extend(out)
        if out[0].text == "a":
            assert await b.abort("req-1")
    assert steps[-1].end.reason == FinishReason.CANCELLED
    assert not await b.abort("req-1") and body.closed


async def test_refusals_before_sending_are_raised_by_start():
    b = backend(Upstream())
    with pytest.raises(LmserveError) as exc:
        b.start(chat_request(sampling=SamplingParams(grammar='root ::= "a"')))
    assert exc.value.kind == ErrorKind.UNSUPPORTED and exc.value.param == "grammar"
    assert b.stats().upstream.requests == 0


async def test_embeddings_come_back_in_input_order():
    vectors = await backend(Upstream()).embed(["a", [1, 2]])
    assert [v.tolist() for v in vectors] == [[0.0, 1.0], [1.0, 1.0]]


async def test_close_closes_the_pool():
    b = backend(Upstream())
    await collect(b.start(chat_request()))
    client = b.http()
    b.close()
    await asyncio.sleep(0)
    assert client.is_closed


async def test_count_tokens_reads_a_one_token_generation_s_usage():
    upstream = Upstream()
    assert await backend(upstream).count_tokens(chat_request(max_tokens=500, n=2)) == 9
    body = upstream.bodies()[-1]
    assert body["max_tokens"] == 1 and "n" not in body


async def test_a_generation_closed_before_it_was_sent_ends_as_cancelled():
    upstream = Upstream()
    b = backend(upstream)
    gen = b.start(chat_request())  # sent from a task: not yet
    gen.close()
    steps = await collect(gen)
    assert [s.end.reason for s in steps] == [FinishReason.CANCELLED]
    assert b.stats().active_requests == 0


async def test_the_connection_is_back_in_the_pool_when_the_iteration_ends():
    upstream = Upstream()
    b = backend(upstream)
    for _ in range(3):
        await collect(b.start(chat_request()))
    assert b.stats().upstream.requests == 3


# -- counting a prompt before it is sent (core.backend.counted) ------------------------------

def counting(flavor: str, answer: Callable[[str, dict[str, Any]], httpx.Response]
             ) -> tuple[UpstreamBackend, list[tuple[str, dict[str, Any]]]]:
    """A fake upstream of `flavor` whose /tokenize and /apply-template answer by `answer`."""
    seen: list[tuple[str, dict[str, Any]]] = []
    models = {"data": [{**MODELS["data"][0], "owned_by": flavor}]}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models)
        body = json.loads(request.content)
        if request.url.path == "/tokenize" and body.get("content") == "a":
            return httpx.Response(200, json={"tokens": [97]})  # the load's probe
        seen.append((request.url.path, body))
        return answer(request.url.path, body)

    b = UpstreamBackend("front", UpstreamSettings(URL, model="smol"),
                        transport=httpx.MockTransport(handle))
    b.load(asyncio.new_event_loop())
    return b, seen


async def test_a_chat_is_counted_by_the_upstreams_chat_tokenize():
    b, seen = counting("vllm", lambda path, body: httpx.Response(
        200, json={"count": 3, "max_model_len": 4096, "tokens": [1, 2, 3]}))
    request = GenerationRequest(messages=[ChatMessage("user", "hi"),
                                          ChatMessage("assistant", "1,")],
                                add_generation_prompt=False, continue_final_message=True)
    assert await b.prompt_tokens(request) == [1, 2, 3]
    assert await b.count_tokens(request) == 3
    path, body = seen[0]
    assert path == "/tokenize" and body["messages"][-1] == {"role": "assistant",
                                                           "content": "1,"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert await b.prompt_tokens(GenerationRequest(prompt="abc")) == [1, 2, 3]
    assert seen[-1][1]["prompt"] == "abc"


async def test_llama_server_renders_by_apply_template_then_tokenizes_the_prompt():
    def answer(path: str, body: dict[str, Any]) -> httpx.Response:
        if path == "/apply-template":
            return httpx.Response(200, json={"prompt": "<s>hi"})
        return httpx.Response(200, json={"tokens": [ord(c) for c in body["content"]]})

    b, seen = counting("llamacpp", answer)
    assert await b.prompt_tokens(chat_request()) == [ord(c) for c in "<s>hi"]
    assert [path for path, _ in seen] == ["/apply-template", "/tokenize"]
    assert seen[0][1] == {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("response", [
    httpx.Response(200, json={"tokens": []}),  # llama-server's /tokenize without `content`
    httpx.Response(400, json={"error": {"message": "no", "type": "invalid_request_error",
                                        "param": "messages",
                                        "code": "unsupported_parameter"}}),
    httpx.Response(200, json={"detail": "?"}),
])
async def test_an_upstream_without_a_chat_tokenize_leaves_the_count_unknown(response):
    b, seen = counting("sglang", lambda path, body: response)
    assert await b.prompt_tokens(chat_request()) is None
    assert await b.prompt_tokens(chat_request()) is None
    assert len(seen) == 1  # not asked again
    prepared = b.prepare(chat_request())
    assert await counted(b, chat_request(), prepared) is prepared  # the route's check skipped


async def test_a_refused_chat_is_not_counted_but_asked_again():
    b, seen = counting("lmserve", lambda path, body: httpx.Response(
        400, json={"error": {"message": "bad", "type": "invalid_request_error"}}))
    assert await b.prompt_tokens(chat_request()) is None
    assert await b.prompt_tokens(chat_request()) is None
    assert len(seen) == 2
