"""oLLM sessions pin their KV through the backend contract: a session turn runs under the
session's key, a one-shot prompt under none, and deleting the session releases it."""

from __future__ import annotations

from tests.unit.chat_service import script
from tests.unit.dialects.ollm.test_ollm_contract import client_for
from tests.unit.dialects.sglang.test_sglang_contract import scripted


def test_session_turns_carry_the_session_key_and_delete_releases_it():
    service = scripted(script(["Hi"]))
    with client_for(service) as c:
        sid = c.post("/v1/sessions", json={}).json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "one"}).status_code == 200
        service.steps = script(["Yes"])
        assert c.post("/v1/prompt", json={"prompt": "alone"}).status_code == 200
        assert [req.session for req, _, _ in service.started] == [f"ollm:{sid}", None]
        assert service.released_sessions == []
        assert c.delete(f"/v1/sessions/{sid}").status_code == 200
        assert service.released_sessions == [f"ollm:{sid}"]
        assert c.delete(f"/v1/sessions/{sid}").status_code == 404
        assert service.released_sessions == [f"ollm:{sid}"]
