"""A real ModelService (prepare, tool plan, chat parser) over a stub model whose generations
are scripted: for dialect route tests of tools, reasoning and structured output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.templates import ChatTemplate
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.core.request import GenerationRequest
from lmserve.service import EngineSettings, ModelService, PreparedPrompt

# ChatML that opens a think block in the generation prompt (as reasoning templates do).
# Earlier replies lose their reasoning, as such templates do.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@dataclass
class StubInfo:
    metadata: dict[str, str] = field(default_factory=dict)
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    architecture: str = "llama"
    n_embd: int = 8


class StubModel:
    """One token per character, so prompts tokenize without a vocabulary."""

    n_vocab = 0x110000

    def __init__(self) -> None:
        self.info = StubInfo()

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True
                 ) -> list[int]:
        return [ord(ch) for ch in text]

    def control_tokens(self, texts: set[str]) -> frozenset[int]:
        return frozenset()  # every character is plain text here


class ScriptedGeneration:
    def __init__(self, steps: list[list[TokenOutput]]) -> None:
        self.steps = steps
        self.closed = False

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._run()

    async def _run(self):  # type: ignore[no-untyped-def]
        try:
            for step in self.steps:
                yield step
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True


def script(chunks: list[str], finish: str = "stop", n_prompt: int = 10) -> list[list[TokenOutput]]:
    """One step per chunk; the last one finishes the choice."""
    steps = [[TokenOutput(0, text, token_ids=[1])] for text in chunks]
    usage = Usage(prompt_tokens=n_prompt, completion_tokens=len(chunks))
    steps.append([TokenOutput(0, "", finish_reason=finish, usage=usage)])
    return steps


class ScriptedService(ModelService):
    def __init__(self, steps: list[list[TokenOutput]], template: str, name: str = "m") -> None:
        super().__init__(name, "/nonexistent.gguf", EngineSettings(parallel=4))
        self.model = StubModel()  # type: ignore[assignment]
        self.template = ChatTemplate(template)
        self.state, self.n_ctx = "ready", 4096
        self.steps = steps
        self.started: list[tuple[GenerationRequest, PreparedPrompt, ScriptedGeneration]] = []

    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None
              ) -> Any:
        prepared = prepared or self.prepare(request)
        self.check_context(len(prepared.tokens), request.max_tokens)
        generation = ScriptedGeneration(self.steps)
        self.started.append((request, prepared, generation))
        return generation


def scripted_client(make_router: Callable[..., APIRouter], chunks: list[str], template: str,
                    finish: str = "stop") -> tuple[TestClient, ScriptedService]:
    """A dialect's router over a ScriptedService that answers with `chunks`."""
    service = ScriptedService(script(chunks, finish), template)
    app = FastAPI()
    app.include_router(make_router(lambda: ScriptedRegistry(service)))
    return TestClient(app), service


class ScriptedRegistry:
    def __init__(self, service: ScriptedService) -> None:
        self.service = service
        self.defaults: dict[str, Any] = {}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([self.service])

    def names(self, service: ModelService) -> list[str]:
        return [service.name]

    def get(self, name: str | None) -> ScriptedService:
        if name != self.service.name:
            raise LmserveError(ErrorKind.MODEL_NOT_FOUND, f"no model {name}", param="model")
        return self.service
