"""A scripted backend: real prompt preparation (template, tool plan, chat parser) over a stub
vocabulary, with scripted generations: for dialect route tests of tools, reasoning, structured
output and failures."""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from lmserve.chat.templates import ChatTemplate
from lmserve.core.backend import (
    CacheFlush,
    EngineStats,
    LoadState,
    ModelBackend,
    ModelCard,
    PreparedPrompt,
    WeightsFacts,
)
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.core.request import GenerationRequest
from lmserve.generation import ParsedGeneration
from lmserve.prompting import Prompter
from lmserve.service import EngineSettings

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


class _Request:
    request_id = "scripted"
    n = 1
    finished = False


class ScriptedGeneration:
    """Stands in for the engine's Generation under lmserve.generation.ParsedGeneration."""

    def __init__(self, steps: list[list[TokenOutput]]) -> None:
        self.steps = steps
        self.closed = False
        self.request = _Request()
        self.stopping: set[int] = set()  # choices asked to stop (ParsedGeneration)
        self.ended: set[int] = set()

    def stop_choice(self, index: int) -> None:
        """As the engine does: the choice's next output is its end, a stop."""
        self.stopping.add(index)

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._run()

    async def _run(self):  # type: ignore[no-untyped-def]
        try:
            made: dict[int, int] = {}
            for step in self.steps:
                outs = []
                for out in step:
                    if out.index in self.ended:
                        continue
                    made[out.index] = made.get(out.index, 0) + len(out.token_ids)
                    if out.index in self.stopping:
                        self.ended.add(out.index)
                        out = TokenOutput(out.index, "", finish_reason="stop", usage=Usage(
                            prompt_tokens=10, completion_tokens=made[out.index]))
                    outs.append(out)
                if outs:
                    yield outs
            self.request.finished = True
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


class ScriptedService:
    """A scripted backend (lmserve.core.backend.ModelBackend, not a ModelService): real prompt
    preparation (lmserve.prompting: template, tool plan, grammar, context check) over the stub
    vocabulary, and generations that replay `steps` through each choice's chat parser."""

    kind = "scripted"

    def __init__(self, steps: list[list[TokenOutput]], template: str, name: str = "m") -> None:
        self.name, self.aliases = name, ()
        self.settings = EngineSettings(parallel=4)
        self.model = StubModel()
        self.template: ChatTemplate | None = ChatTemplate(template)
        self.state, self.n_ctx = "ready", 4096
        self.steps = steps
        self.started: list[tuple[GenerationRequest, PreparedPrompt, ScriptedGeneration]] = []
        self.aborted: list[str] = []
        self.released_sessions: list[str] = []
        self.vision = False
        self.draining = False
        self.failed_with: LmserveError | None = None

    # -- the card --------------------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        return ModelCard(name=self.name, aliases=self.aliases, kind=self.kind,
                         source="/nonexistent.gguf", state=LoadState(self.state),
                         progress=1.0, n_ctx=self.n_ctx, parallel=self.settings.parallel,
                         max_queue=self.settings.max_queue, step_tokens=self.settings.step_tokens,
                         embedding_ctx=self.settings.embedding_ctx,
                         chat_template=self.template.source if self.template else None,
                         reasoning_tags=self._prompts().reasoning_tags,
                         weights=WeightsFacts(architecture="llama", n_embd=8, n_vocab=0x110000),
                         settings={"parallel": self.settings.parallel})

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def healthy(self) -> bool:
        return self.state != "failed"

    def require_ready(self) -> ModelCard:
        if self.state != "ready":
            raise LmserveError(ErrorKind.LOADING, f"model '{self.name}' is still loading",
                               code="model_loading", retry_after=2.0)
        return self.card

    def load(self, loop: Any, progress: Any = None) -> None:
        self.state = "ready"

    def close(self) -> None:
        pass

    # -- prompts ---------------------------------------------------------------------------
    def _prompts(self) -> Prompter:
        return Prompter(self.name, self.model, self.template,  # type: ignore[arg-type]
                        n_ctx=self.n_ctx, media=self.settings.media,
                        context_overflow=self.settings.context_overflow)

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        self.require_ready()
        return self._prompts().prepare(request)

    async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
        return request  # no projector: preparation refuses images

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._prompts().tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Any) -> str:
        return "".join(chr(t) for t in tokens)

    def check_context(self, n_prompt: int, max_tokens: int | None, *,
                      truncating: bool = False) -> int:
        return self._prompts().check_context(n_prompt, max_tokens, truncating=truncating)

    def chat_parser(self, request: GenerationRequest, prepared: PreparedPrompt) -> Any:
        return self._prompts().chat_parser(request, prepared)

    def adapters(self, model: str | None, selection: Any = None) -> tuple[()]:
        return ()

    # -- generation ------------------------------------------------------------------------
    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None, *,
              parse: bool | None = None) -> Any:
        prepared = prepared or self.prepare(request)
        self.check_context(len(prepared.tokens), request.max_tokens,
                           truncating=prepared.truncating)
        generation = ScriptedGeneration(self.steps)
        self.started.append((request, prepared, generation))
        parse = request.messages is not None if parse is None else parse
        return ParsedGeneration(generation,  # type: ignore[arg-type]
                                (lambda: self.chat_parser(request, prepared)) if parse else None)

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return False

    # -- shutdown: the registry drains and then cuts what is left -----------------------------
    def drain(self) -> None:
        self.draining = True

    @property
    def busy(self) -> int:
        return sum(1 for *_, g in self.started if not g.closed)

    async def fail_all(self, error: LmserveError) -> None:
        self.failed_with = error

    async def embed(self, inputs: Any, adapters: Any = ()) -> list[np.ndarray]:
        return [np.ones(8, dtype=np.float32) for _ in inputs]

    async def flush_cache(self) -> CacheFlush | None:
        return CacheFlush(0)

    async def release_session(self, session: str) -> bool:
        self.released_sessions.append(session)
        return False

    def stats(self) -> EngineStats | None:
        return EngineStats(active_requests=sum(1 for *_, g in self.started if not g.closed))


ScriptedBackend = ScriptedService  # the name the contract's docs use


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

    def names(self, service: ModelBackend) -> list[str]:
        return [service.name]

    def get(self, name: str | None) -> ScriptedService:
        if name != self.service.name:
            raise LmserveError(ErrorKind.MODEL_NOT_FOUND, f"no model {name}", param="model")
        return self.service


def imports(package: pathlib.Path) -> Iterator[tuple[str, str]]:
    """(file name, module) for every import in a dialect package's modules; `from m import n`
    gives m and m.n."""
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield path.name, node.module
                yield from ((path.name, f"{node.module}.{a.name}") for a in node.names)
            elif isinstance(node, ast.Import):
                yield from ((path.name, alias.name) for alias in node.names)
