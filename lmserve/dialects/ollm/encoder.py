"""Pure translation: choice steps and stored sessions -> oLLM response bodies and SSE events
(status, text, complete, error), and errors in oLLM's (FastAPI's) {"detail": ...} shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.core.backend import ChoiceStep
from lmserve.core.errors import LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.core.observe import with_request_id

BACKEND = "llama.cpp"
Event = tuple[str, dict[str, Any]]


def error_body(exc: LmserveError) -> dict[str, Any]:
    return with_request_id({"detail": exc.message})


def validation_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's 422 body, which oLLM's server answers for a malformed request."""
    return with_request_id({"detail": errors})


def usage_body(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens, "total_tokens": usage.total_tokens}


@dataclass
class Turn:
    """One prompt's output as it arrives; times are seconds since the request was submitted."""

    model: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    first_token_s: float | None = None

    def add(self, out: ChoiceStep | TokenOutput, elapsed: float) -> str:
        """Take one step's output; returns the new text."""
        if self.first_token_s is None and out.token_ids:
            self.first_token_s = elapsed
        self.text += out.text
        if out.finished:
            self.finish_reason, self.usage, self.error = out.finish_reason, out.usage, out.error
        return out.text

    def metadata(self, elapsed: float) -> dict[str, str]:
        """oLLM's metadata: a flat map of strings."""
        usage = self.usage or Usage()
        meta = {"model_reference": self.model, "backend": BACKEND,
                "finish_reason": self.finish_reason or "", "elapsed_ms": _ms(elapsed),
                "time_to_first_token_ms": _ms(self.first_token_s)}
        meta.update({k: str(v) for k, v in usage_body(usage).items()})
        return meta

    def body(self, elapsed: float, session_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"text": self.text, "metadata": self.metadata(elapsed),
                                "usage": usage_body(self.usage or Usage())}
        if session_id is not None:
            body["session_id"] = session_id
        return body

    def stored(self, prompt: str, now: float) -> list[dict[str, Any]]:
        """The user and assistant messages a session keeps for this turn."""
        return [{"role": "user", "content": prompt, "created_at": now},
                {"role": "assistant", "content": self.text, "created_at": now,
                 "finish_reason": self.finish_reason,
                 "usage": usage_body(self.usage or Usage())}]


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def status_event(message: str) -> Event:
    return "status", {"message": message}


def text_event(delta: str) -> Event:
    return "text", {"delta": delta}


def complete_event(body: dict[str, Any]) -> Event:
    return "complete", body


def error_event(exc: LmserveError) -> Event:
    return "error", error_body(exc)


def session_body(session: Any) -> dict[str, Any]:
    """A stored session in oLLM's shape, with lmserve's times and counts beside it."""
    return {"session_id": session.id, "session_name": session.metadata.get("session_name", ""),
            "model_reference": session.model, "system_prompt": session.system or "",
            "generation": session.metadata.get("generation", {}),
            "messages": [_message(m) for m in getattr(session, "messages", [])],
            "message_count": session.message_count, "created_at": session.created_at,
            "updated_at": session.updated_at}


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if k != "content"}
    out["content"] = [{"type": "text", "value": message.get("content", "")}]
    return out


def health_body(*, status: str, version: str, local_only: bool,
                models: dict[str, Any]) -> dict[str, Any]:
    return {"ok": status == "ok", "service": "lmserve", "version": version,
            "server_mode": "local-only" if local_only else "network", "status": status,
            "models": models}


def model_entry(*, reference: str, name: str, source: str, path: str, materialized: bool,
                discovery_source: str, runtime: dict[str, Any]) -> dict[str, Any]:
    """oLLM's model discovery fields, and what this server runs it with under `runtime`."""
    served = runtime.get("served_as")
    return {"model_reference": reference, "normalized_name": name, "source_kind": source,
            "support_level": "generic", "modalities": ["text"], "path": path,
            "architecture": runtime.get("architecture"), "model_type": "gguf",
            "materialized": materialized, "discovery_source": discovery_source,
            "resolution_message": f"served as '{served}'" if served else
            ("a local GGUF file; not served here (POST /v1/plan plans it)" if materialized
             else "not installed"),
            "runtime_plan": {"backend_id": BACKEND,
                             "reason": "llama.cpp on the CPU, prefix cache on"},
            "runtime": runtime}
