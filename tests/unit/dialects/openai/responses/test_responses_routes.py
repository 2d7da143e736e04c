"""The Responses routes over a scripted service and a memory store: create, stream, chain,
retrieve, delete, input items, storage off, failures, disconnects and the WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from lmserve.app import App
from lmserve.chat.overflow import fit_chat
from lmserve.chat.turn import plan_turn, turn_parser
from lmserve.core.backend import PreparedPrompt
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.dialects.openai.responses import turns
from lmserve.dialects.openai.responses.routes import make_router
from lmserve.dialects.openai.responses.schema import ResponseCreate
from lmserve.generation import ParsedGeneration
from lmserve.http.app import AppState, StoreSettings, create_app
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings
from tests.unit.chat_service import ScriptedGeneration
from tests.unit.dialects.anthropic.test_anthropic import STEPS, parse_sse
from tests.unit.dialects.anthropic.test_anthropic_routes import FakeRegistry, FakeService


class Service(FakeService):
    """Plans the turn as the real service does (tools, fallback prompt, call format)."""

    def prepare(self, gen: Any) -> PreparedPrompt:
        if gen.context_overflow != "truncate":
            return self._render(gen)
        prepared, dropped = fit_chat(gen, self._render, self.n_ctx)
        return dataclasses.replace(prepared, dropped_messages=dropped, truncating=True)

    def _render(self, gen: Any) -> PreparedPrompt:
        plan = plan_turn(gen, self.template)
        text = self.template.render([m.as_template_dict() for m in plan.messages],
                                    add_generation_prompt=True)
        return PreparedPrompt(self.tokenize(text), text, plan.grammar, plan.tool_format)

    def chat_parser(self, gen: Any, prepared: PreparedPrompt) -> Any:
        return turn_parser(prepared.tool_format, None, prepared.text,
                           parallel=gen.parallel_tool_calls)

    def start(self, gen: Any, prepared: PreparedPrompt, *, parse: bool | None = None) -> Any:
        """As a backend starts: each step comes through the turn's chat parser."""
        self.check_context(len(prepared.tokens), gen.max_tokens)
        generation = ScriptedGeneration(self.steps)
        self.started.append((gen, prepared, generation))
        return ParsedGeneration(generation,  # type: ignore[arg-type]
                                lambda: self.chat_parser(gen, prepared))

    def check_context(self, n_prompt: int, max_tokens: int | None) -> int:
        if n_prompt >= self.n_ctx:
            raise LmserveError(ErrorKind.CONTEXT_LENGTH_EXCEEDED, "the prompt is too long",
                               param="input", code="context_length_exceeded")
        return max_tokens or self.n_ctx - n_prompt

    @property
    def prompts(self) -> list[str]:
        return [prepared.text for _, prepared, _ in self.started]


class DefaultsRegistry(FakeRegistry):
    """A resource's view: its default parameters fill what a request leaves unset."""

    defaults = {"max_tokens": 5, "temperature": 0.0}


def make_app(service: Service, store: str = "memory",
             registry: type[FakeRegistry] = FakeRegistry) -> tuple[FastAPI, AppState]:
    state = AppState(registry(service), StoreSettings(url=store))  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        yield
        await state.close()

    app = FastAPI(lifespan=lifespan)
    app.state.lmserve = state
    app.include_router(make_router(lambda: registry(service)))  # type: ignore[arg-type]
    return app, state


@pytest.fixture()
def service() -> Service:
    return Service(STEPS)


@pytest.fixture()
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(make_app(service)[0]) as c:
        yield c


def create(client: TestClient, **kw: Any) -> dict[str, Any]:
    r = client.post("/v1/responses", json={"model": "m", "input": "hi", **kw})
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert set(r.json()) - {"request_id"} == {"error"}  # request_id: in a full app
    return r.json()["error"]


def test_create_retrieve_delete(client, service):
    made = create(client, metadata={"topic": "greeting"})
    assert made["status"] == "completed" and made["output_text"] == "Hello"
    assert made["store"] is True and made["metadata"] == {"topic": "greeting"}
    assert service.prompts[0] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert service.started[0][2].closed
    assert client.get(f"/v1/responses/{made['id']}").json() == made
    assert client.get(f"/v1/responses/{made['id']}?include[]=reasoning.encrypted_content"
                      ).json() == made
    r = client.get(f"/v1/responses/{made['id']}?include[]=everything")
    assert error_of(r, 400)["param"] == "include"
    assert error_of(client.get(f"/v1/responses/{made['id']}?stream=true"), 400)["param"] == \
        "stream"
    r = client.delete(f"/v1/responses/{made['id']}")
    assert r.json() == {"id": made["id"], "object": "response.deleted", "deleted": True}
    for r in (client.get(f"/v1/responses/{made['id']}"),
              client.delete(f"/v1/responses/{made['id']}")):
        assert error_of(r, 404)["message"] == f"Response with id '{made['id']}' not found."


def test_chains_rebuild_the_conversation_without_earlier_instructions(client, service):
    first = create(client, instructions="Be terse.")
    second = create(client, input="again", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"] and second["instructions"] is None
    assert service.prompts[0].startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert service.prompts[1] == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                                  "Hello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    # deleting the middle of a chain breaks nothing after it: the record holds its history
    third = create(client, input="three", previous_response_id=second["id"])
    client.delete(f"/v1/responses/{first['id']}")
    client.delete(f"/v1/responses/{second['id']}")
    create(client, input="four", previous_response_id=third["id"])
    assert service.prompts[-1].count("<|im_start|>user") == 4
    r = client.post("/v1/responses", json={"model": "m", "input": "x",
                                           "previous_response_id": second["id"]})
    error = error_of(r, 404)
    assert error["param"] == "previous_response_id"
    assert error["code"] == "previous_response_not_found"


def test_input_items_list_the_conversation_the_response_was_made_from(client):
    first = create(client)
    second = create(client, input=[{"role": "user", "content": "again"}],
                    previous_response_id=first["id"])
    page = client.get(f"/v1/responses/{second['id']}/input_items").json()
    assert page["object"] == "list" and page["has_more"] is False
    roles = [(i["role"], i["content"][0]["text"]) for i in page["data"]]
    assert roles == [("user", "again"), ("assistant", "Hello"), ("user", "hi")]  # desc
    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
    asc = client.get(f"/v1/responses/{second['id']}/input_items?order=asc&limit=2").json()
    assert [i["content"][0]["text"] for i in asc["data"]] == ["hi", "Hello"] and asc["has_more"]
    rest = client.get(f"/v1/responses/{second['id']}/input_items",
                      params={"order": "asc", "after": asc["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["again"]
    assert rest["has_more"] is False
    assert error_of(client.get(f"/v1/responses/{second['id']}/input_items?limit=0"),
                    400)["param"] == "limit"
    assert error_of(client.get(f"/v1/responses/{second['id']}/input_items?order=up"),
                    400)["param"] == "order"
    error_of(client.get("/v1/responses/resp_nope/input_items"), 404)


def test_store_false_keeps_nothing(client):
    made = create(client, store=False)
    assert made["store"] is False
    error_of(client.get(f"/v1/responses/{made['id']}"), 404)
    r = client.post("/v1/responses", json={"model": "m", "input": "x",
                                           "previous_response_id": made["id"]})
    assert error_of(r, 404)["code"] == "previous_response_not_found"


def test_storage_off_answers_stored_operations_with_a_clear_400(service):
    with TestClient(make_app(service, store="none")[0]) as client:
        made = create(client)
        assert made["store"] is False and made["status"] == "completed"
        for r in (client.get(f"/v1/responses/{made['id']}"),
                  client.delete(f"/v1/responses/{made['id']}"),
                  client.get(f"/v1/responses/{made['id']}/input_items"),
                  client.post("/v1/responses", json={"model": "m", "input": "x",
                                                     "previous_response_id": made["id"]})):
            error = error_of(r, 400)
            assert error["code"] == "storage_disabled" and "--store none" in error["message"]


def test_streaming_events_and_the_stored_record(client):
    r = client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert [name for name, _ in events][-2:] == ["response.output_item.done",
                                                  "response.completed"]
    final = events[-1][1]["response"]
    assert client.get(f"/v1/responses/{final['id']}").json() == final


@contextlib.asynccontextmanager
async def started_turn(service: Service) -> AsyncIterator[tuple[AppState, turns.Turn]]:
    """A turn begun outside HTTP, to watch its events one by one."""
    _, state = make_app(service)
    await state.open()
    try:
        body = ResponseCreate(model="m", input="hi")
        yield state, await turns.begin(state, FakeRegistry(service), body)  # type: ignore[arg-type]
    finally:
        await state.close()


async def test_the_record_is_stored_before_the_final_event(service):
    async with started_turn(service) as (state, turn):
        store = state.responses()
        async for event in turns.run(turn):
            stored = await store.get(turn.events.response["id"])
            if event["type"] == "response.completed":
                assert stored is not None and stored.response == event["response"]
            else:
                assert stored is None


def test_errors_after_the_start_travel_inside_the_stream_and_are_stored(service):
    service.steps = [[TokenOutput(0, "Hi")],
                     [TokenOutput(0, finish_reason="error", error="decode failed")]]
    with TestClient(make_app(service)[0]) as client:
        r = client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
        events = parse_sse(r.content)
        assert [name for name, _ in events][-2:] == ["error", "response.failed"]
        assert events[-2][1]["message"] == "decode failed"
        failed = events[-1][1]["response"]
        stored = client.get(f"/v1/responses/{failed['id']}").json()
        assert stored["status"] == "failed" and stored["output_text"] == "Hi"
        error = error_of(client.post("/v1/responses", json={"model": "m", "input": "hi"}), 500)
        assert error["type"] == "server_error"


async def test_a_client_that_leaves_cancels_the_generation_and_the_partial_is_stored(service):
    async with started_turn(service) as (state, turn):
        events = turns.run(turn)
        seen = [await events.__anext__() for _ in range(5)]  # up to the first delta
        assert seen[-1]["delta"] == "Hel"
        await events.aclose()  # what Starlette does when the client goes away
        assert service.started[0][2].closed  # the engine generation under it
        for _ in range(10):
            await asyncio.sleep(0)
        stored = await state.responses().get(turn.events.response["id"])
        assert stored is not None and stored.response["status"] == "cancelled"
        assert stored.response["output_text"] == "Hel"


def test_function_calls_and_outputs_reach_the_prompt(client, service):
    create(client, input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])
    prompt = service.prompts[0]
    assert '"name": "weather"' in prompt and '"city": "Paris"' in prompt and "sunny" in prompt
    assert "<|im_start|>tool" not in prompt  # the template knows no tools: rendered as text


def test_truncation_auto_drops_the_oldest_turns(service):
    with TestClient(make_app(service)[0]) as client:
        first = create(client, input="one two three four five six seven eight")
        service.n_ctx = 8
        kw = {"input": "nine", "previous_response_id": first["id"]}
        r = client.post("/v1/responses", json={"model": "m", **kw})
        assert error_of(r, 400)["code"] == "context_length_exceeded"
        r = client.post("/v1/responses", json={"model": "m", "truncation": "auto", **kw})
        made = r.json()
        assert r.status_code == 200 and made["truncation"] == "auto"
        assert r.headers["X-Lmserve-Truncated-Messages"] == "2"
        assert "one two" not in service.prompts[-1] and "nine" in service.prompts[-1]
        items = client.get(f"/v1/responses/{made['id']}/input_items").json()["data"]
        assert len(items) == 3  # the stored conversation is whole; only the prompt is cut


class TruncatingRegistry(FakeRegistry):
    defaults = {"context_overflow": "truncate"}


def test_truncation_follows_a_resource_default(service):
    service.n_ctx = 8
    with TestClient(make_app(service, registry=TruncatingRegistry)[0]) as client:
        long = [{"role": "user", "content": "one two three four five six seven"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "nine"}]
        assert create(client, input=long)["truncation"] == "auto"
        r = client.post("/v1/responses", json={"model": "m", "input": long,
                                               "truncation": "disabled"})
        assert error_of(r, 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("fields, status, param", [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    ({"input": None}, 400, "input"),
    ({"model": "other"}, 404, "model"),
    ({"temperature": 3}, 400, "temperature"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400,
     "input[0].content[0].image_url"),
])
def test_bad_requests_in_openai_shape(client, fields, status, param):
    payload = {k: v for k, v in {"model": "m", "input": "hi", **fields}.items() if v is not None}
    error = error_of(client.post("/v1/responses", json=payload), status)
    assert error["param"] == param and error["type"] == "invalid_request_error"


# ---- WebSocket ----------------------------------------------------------------------------

def until_final(ws: Any) -> list[dict[str, Any]]:
    events = []
    while not events or events[-1]["type"] not in ("response.completed", "response.failed",
                                                    "response.incomplete"):
        events.append(ws.receive_json())
    return events


def test_websocket_runs_responses_in_turn_and_chains_them(client, service):
    with client.websocket_connect("/v1/responses") as ws:
        ws.send_json({"type": "response.create", "model": "m", "input": "hi"})
        first = until_final(ws)
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        ws.send_json({"type": "response.create", "model": "m", "input": "again",
                      "stream_id": "lane-1",
                      "previous_response_id": first[-1]["response"]["id"]})
        second = until_final(ws)
        assert {e["stream_id"] for e in second} == {"lane-1"}
    assert "Hello<|im_end|>\n<|im_start|>user\nagain" in service.prompts[1]
    # and across connections, through the store
    with client.websocket_connect("/v1/responses") as ws:
        ws.send_json({"type": "response.create", "model": "m", "input": "three",
                      "previous_response_id": second[-1]["response"]["id"]})
        assert until_final(ws)[-1]["response"]["status"] == "completed"
    assert service.prompts[2].count("<|im_start|>user") == 3


def test_websocket_errors_keep_the_connection_open(client):
    with client.websocket_connect("/v1/responses") as ws:
        for message, status, param in (
                ("{not json", 400, None),
                ('{"type": "response.steer"}', 400, "type"),
                ('{"type": "response.create", "input": "x"}', 400, "model"),
                ('{"type": "response.create", "model": "m", "input": "x", "stream": false}',
                 400, "stream"),
                ('{"type": "response.create", "model": "m", "input": "x", '
                 '"previous_response_id": "resp_gone"}', 404, "previous_response_id")):
            ws.send_text(message)
            event = ws.receive_json()
            assert event["type"] == "error" and event["status"] == status
            assert event["error"]["param"] == param and event["error"]["message"]
        ws.send_json({"type": "response.create", "model": "m", "input": "fine"})
        assert until_final(ws)[-1]["type"] == "response.completed"


def test_websocket_failure_after_the_start_uses_the_websocket_error_shape(service):
    service.steps = [[TokenOutput(0, "Hi")],
                     [TokenOutput(0, finish_reason="error", error="decode failed")]]
    with TestClient(make_app(service)[0]) as client:
        with client.websocket_connect("/v1/responses") as ws:
            ws.send_json({"type": "response.create", "model": "m", "input": "hi"})
            events = until_final(ws)
    assert events[-2]["type"] == "error" and events[-2]["error"]["code"] == "server_error"
    assert events[-1]["type"] == "response.failed"


# ---- inside the real app ----------------------------------------------------------------------

def test_mounted_in_the_real_app_with_auth_and_loading():
    registry = ModelRegistry()
    registry.add("tiny", "/nonexistent/tiny.gguf", EngineSettings())
    with TestClient(create_app(registry, load_on_startup=False, api_keys=("k",))) as client:
        r = client.post("/v1/responses", json={"model": "tiny", "input": "hi"})
        assert error_of(r, 401)["type"] == "authentication_error"
        r = client.post("/v1/responses", json={"model": "tiny", "input": "hi"},
                        headers={"Authorization": "Bearer k"})
        assert error_of(r, 503)["code"] == "model_loading"
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/responses") as ws:
                ws.receive_json()
        with client.websocket_connect("/v1/responses", headers={"x-api-key": "k"}) as ws:
            ws.send_json({"type": "response.create", "model": "tiny", "input": "hi"})
            assert ws.receive_json()["status"] == 503
    paths = create_app(ModelRegistry()).openapi()["paths"]
    assert set(paths["/v1/responses"]) == {"post"}
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    assert set(paths["/v1/responses/{response_id}/input_items"]) == {"get"}


def test_resource_defaults_fill_unset_parameters(service):
    with TestClient(make_app(service, registry=DefaultsRegistry)[0]) as client:
        made = create(client)
        assert (made["max_output_tokens"], made["temperature"]) == (5, 0.0)
        assert service.started[0][0].max_tokens == 5
        made = create(client, max_output_tokens=9, temperature=0.7)
        assert (made["max_output_tokens"], made["temperature"]) == (9, 0.7)


def test_a_resource_serves_responses_under_its_openai_prefix():
    app = App(store="memory", load_on_startup=False)
    app.models.add_model(path="/llm/", model=resolve("smollm2").path, name="assistant")
    with TestClient(app.asgi) as client:
        r = client.post("/llm/openai/v1/responses", json={"model": "assistant", "input": "hi"})
        assert error_of(r, 503)["code"] == "model_loading"
        r = client.get("/llm/openai/v1/responses/resp_x")
        assert error_of(r, 404)["message"] == "Response with id 'resp_x' not found."
        with client.websocket_connect("/llm/openai/v1/responses") as ws:
            ws.send_json({"type": "response.create", "model": "assistant", "input": "hi"})
            assert ws.receive_json()["status"] == 503


CALL_STEPS = [[TokenOutput(0, '<tool_call>\n{"name": "f", "arguments": ')],
              [TokenOutput(0, '{"q": "x"}}\n</tool_call>', finish_reason="stop",
                           usage=Usage(prompt_tokens=5, completion_tokens=4))]]
F_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}}


def test_a_function_call_is_an_output_item_and_chains():
    service = Service(CALL_STEPS)
    with TestClient(make_app(service)[0]) as client:
        made = create(client, tools=[F_TOOL], tool_choice="required", parallel_tool_calls=False)
        [call] = made["output"]
        assert (call["type"], call["name"], call["arguments"], call["status"]) == \
            ("function_call", "f", '{"q": "x"}', "completed")
        assert call["id"].startswith("fc_") and made["output_text"] == ""
        assert "# Tools" in service.prompts[0] and service.started[0][1].grammar
        service.steps = STEPS
        follow = create(client, previous_response_id=made["id"], tools=[F_TOOL], input=[
            {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}])
        assert follow["output_text"] == "Hello"
        assert '"q": "x"' in service.prompts[1] and "sunny" in service.prompts[1]


def test_a_streamed_function_call():
    with TestClient(make_app(Service(CALL_STEPS))[0]) as client:
        with client.stream("POST", "/v1/responses", json={
                "model": "m", "input": "hi", "stream": True, "tools": [F_TOOL]}) as r:
            body = "".join(r.iter_text())
    kinds = [line[len("event: "):] for line in body.splitlines() if line.startswith("event: ")]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
