"""HTTP behaviour that needs no model: loading state, auth, error shapes."""

from __future__ import annotations

from fastapi.testclient import TestClient

from lmserve.http.app import create_app
from lmserve.models.registry import ModelRegistry
from lmserve.service import EngineSettings

MSG = [{"role": "user", "content": "hi"}]


def make_client(**kw) -> TestClient:
    registry = ModelRegistry()
    registry.add("tiny", "/nonexistent/tiny.gguf", EngineSettings(), aliases=["tiny.gguf"])
    return TestClient(create_app(registry, load_on_startup=False, **kw))


def test_requests_during_loading_get_503_with_retry_after():
    with make_client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "model_loading"
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"


def test_unknown_model_404_before_loading_matters():
    with make_client() as c:
        r = c.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404
        assert r.json()["error"] == {
            "message": r.json()["error"]["message"], "type": "invalid_request_error",
            "param": "model", "code": "model_not_found"}
        assert "tiny" in r.json()["error"]["message"]


def test_validation_errors_use_openai_shape_with_param():
    with make_client() as c:
        cases = [
            ({"model": "tiny", "messages": MSG, "temperature": 3}, "temperature"),
            ({"model": "tiny", "messages": MSG, "n": 0}, "n"),
            ({"model": "tiny", "messages": []}, "messages"),
            ({"model": "tiny", "messages": MSG, "max_tokens": "many"}, "max_tokens"),
            ({"messages": MSG}, "model"),
            ({"model": "tiny", "messages": MSG, "stop": 5}, "stop"),
        ]
        for body, param in cases:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, body
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
        r = c.post("/v1/chat/completions", content=b"[1,", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()


def test_api_keys():
    with make_client(api_keys=("secret",)) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
        assert {m["id"] for m in ok.json()["data"]} == {"tiny", "tiny.gguf"}
        assert c.get("/v1/models", headers={"x-api-key": "secret"}).status_code == 200
        assert c.get("/health").status_code == 503  # health needs no key


def test_openapi_lists_routes():
    with make_client() as c:
        paths = c.get("/openapi.json").json()["paths"]
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                     "/health", "/metrics"):
            assert path in paths
