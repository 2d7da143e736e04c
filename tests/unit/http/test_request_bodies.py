"""Bodies that are not JSON objects, on every route that takes a body, in every dialect; and
the OpenAPI document's path parameters. No model is needed: these answers come before any
model is looked up."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.http.app import create_app
from lmserve.models.registry import ModelRegistry
from lmserve.service import EngineSettings

BAD_BODIES = {
    "not UTF-8": b'{"model": "tiny\xff\xc3"}',
    "not JSON": b'{"model": tiny',
    "an array": b"[]",
    "a string": b'"x"',
    "a number": b"1",
    "null": b"null",
    "empty": b"",
}


def _openai(body: dict[str, Any]) -> bool:
    error = body.get("error")
    return (isinstance(error, dict) and error.get("type") == "invalid_request_error"
            and error.get("code") == "invalid_json" and {"message", "param"} <= error.keys())


def _anthropic(body: dict[str, Any]) -> bool:
    return (body.get("type") == "error"
            and body["error"].get("type") == "invalid_request_error"
            and isinstance(body["error"].get("message"), str))


def _ollama(body: dict[str, Any]) -> bool:
    return isinstance(body.get("error"), str)


def _sglang(body: dict[str, Any]) -> bool:
    return body.get("error", {}).get("code") == 400 and "message" in body["error"]


def _ollm(body: dict[str, Any]) -> bool:
    return isinstance(body.get("detail"), str)


def _native(body: dict[str, Any]) -> bool:
    error = body.get("error", {})
    return error.get("type") == "invalid_request" and error.get("code") == "invalid_json"


SHAPES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "OpenAI": _openai, "Anthropic": _anthropic, "Ollama": _ollama, "SGLang": _sglang,
    "oLLM": _ollm, "tiny": _native}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    registry = ModelRegistry()
    registry.add("tiny", "/nonexistent/tiny.gguf", EngineSettings())
    with TestClient(create_app(registry, load_on_startup=False)) as c:
        yield c


def _operations(client: TestClient) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            yield method.upper(), path, operation


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_body_route_answers_400_in_its_dialect(client: TestClient) -> None:
    checked = set()
    for method, path, operation in _operations(client):
        if "requestBody" not in operation:
            continue
        shape = SHAPES[operation["tags"][0]]
        for name, content in BAD_BODIES.items():
            for headers in ({"content-type": "application/json"}, {}):
                r = client.request(method, _concrete(path), content=content, headers=headers)
                assert r.status_code == 400, (method, path, name, headers, r.text)
                assert shape(r.json()), (method, path, name, r.text)
                assert "request body" in r.text, (method, path, name, r.text)
        checked.add(operation["tags"][0])
    assert checked == set(SHAPES)


def test_a_json_body_with_another_content_type_is_refused_with_the_reason(
        client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny"}',
                    headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert "application/json" in r.json()["error"]["message"]


def test_bad_json_names_what_is_wrong(client: TestClient) -> None:
    r = client.post("/v1/messages", content=b'{"model": tiny}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/api/chat", content=b'{"model": "\xff"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]
    r = client.post("/v1/prompt", content=b"[]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["detail"] == ("the request body must be a JSON object, not an array "
                                  "(Content-Type: application/json)")


def test_ollm_field_errors_keep_fastapis_422(client: TestClient) -> None:
    r = client.post("/v1/prompt", json={"prompt": 5})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list)


def test_every_path_parameter_is_declared(client: TestClient) -> None:
    for method, path, operation in _operations(client):
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{([^}:]+)", path)), (method, path)
