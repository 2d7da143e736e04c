"""Several names of one GGUF file (models.views): equal engine settings share one engine, as
an alias or, when their per-name settings differ, as a view with its own chat template,
response schema, defaults and system prompt; different engine settings get an engine each.
Registration reads headers only: nothing is loaded here (the view's prompting runs over a
stub vocabulary)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from lmserve import cli, config
from lmserve.chat.templates import ChatTemplate
from lmserve.core.events import TextDelta
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.models.library import LibrarySettings, inspect
from lmserve.models.managed import ManagedModel
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.models.setup import StartModel, fill
from lmserve.models.views import NameView, engine_differences
from lmserve.service import EngineSettings, ModelService
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedGeneration, StubInfo, StubModel, script

PLAIN = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
SHOUT = "{% for m in messages %}{{ m.content | upper }}!{% endfor %}"
SCHEMA = ('{"type": "object", "properties": {"content": {"type": "string"}}, '
          '"x-regex": "(?P<content>.*)"}')


def serve_config(tmp_path: Path, text: str) -> ModelRegistry:
    """What `lmserve serve --config` registers for these [models.X] sections."""
    path = tmp_path / "lmserve.toml"
    path.write_text(text)
    cfg = config.build(config.load_file(str(path)))
    registry = ModelRegistry()
    fill(registry, [StartModel(s.name, resolve(s.reference).path, settings, s.aliases,
                               s.keep_alive, s.at_start, s.params)
                    for s, settings in cfg.model_sections], LibrarySettings(), cfg.engine)
    return registry


def test_same_settings_are_aliases_of_one_engine(tmp_path: Path) -> None:
    registry = serve_config(tmp_path, '[models.a]\nmodel = "smollm2"\nctx = 1024\n'
                                      '[models.b]\nmodel = "smollm2"\nctx = 1024\n')
    assert registry.get("a") is registry.get("b")
    assert isinstance(registry.get("a"), ManagedModel) and len(registry.manager.models) == 1
    assert registry.names(registry.get("a")) == ["a", "b"]


def test_a_different_chat_template_is_a_view_over_the_same_engine(tmp_path: Path) -> None:
    registry = serve_config(
        tmp_path, '[models.a]\nmodel = "smollm2"\nctx = 1024\n'
                  f'[models.b]\nmodel = "smollm2"\nctx = 1024\nchat_template = """{PLAIN}"""\n'
                  'params = { temperature = 0.1 }\n')
    a, b = registry.get("a"), registry.get("b")
    assert isinstance(a, ManagedModel) and isinstance(b, NameView) and b.base is a
    assert len(registry.manager.models) == 1  # loaded once
    header_template = a.entry.header.chat_template if a.entry.header else None
    assert header_template and a.card.chat_template == header_template
    assert b.card.chat_template == PLAIN and b.card.name == "b"
    assert b.card.settings["chat_template_override"] is True
    assert not a.card.settings["chat_template_override"]
    assert dict(b.card.defaults) == {"temperature": 0.1} and not a.card.defaults
    assert b.card.n_ctx == a.card.n_ctx == 1024 and b.card.source == a.card.source
    assert [s.name for s in registry] == ["a", "b"]  # both listed
    assert registry.managed("b") is a  # the admin routes act on the engine
    assert registry.engine_names(a) == ["a", "b"]
    assert b.stats() is None and b.busy == 0  # the engine's, counted once


def test_a_different_response_schema_or_default_is_a_view(tmp_path: Path) -> None:
    registry = serve_config(
        tmp_path, '[models.a]\nmodel = "smollm2"\nparallel = 2\n'
                  f"[models.b]\nmodel = \"smollm2\"\nparallel = 2\nresponse_schema = '{SCHEMA}'\n"
                  '[models.c]\nmodel = "smollm2"\nparallel = 2\nparams = { top_k = 5 }\n')
    a, b, c = (registry.get(n) for n in "abc")
    assert isinstance(b, NameView) and isinstance(c, NameView)
    assert b.base is a and c.base is a and len(registry.manager.models) == 1
    assert b.card.settings["response_schema"] is True
    assert a.card.settings["response_schema"] is False
    assert dict(c.card.defaults) == {"top_k": 5}


def test_different_engine_settings_get_an_engine_each(tmp_path: Path) -> None:
    registry = serve_config(tmp_path, '[models.a]\nmodel = "smollm2"\nctx = 1024\n'
                                      '[models.b]\nmodel = "smollm2"\nctx = 2048\nparallel = 2\n')
    a, b = registry.get("a"), registry.get("b")
    assert isinstance(a, ManagedModel) and isinstance(b, ManagedModel) and a is not b
    assert (a.card.n_ctx, b.card.n_ctx) == (1024, 2048)
    assert (a.card.parallel, b.card.parallel) == (8, 2)
    assert len(registry.manager.models) == 2
    assert engine_differences(a.settings, b.settings) == ["n_ctx", "parallel"]


def test_a_third_name_shares_the_engine_its_settings_match(tmp_path: Path) -> None:
    registry = serve_config(tmp_path, '[models.a]\nmodel = "smollm2"\nctx = 1024\n'
                                      '[models.b]\nmodel = "smollm2"\nctx = 2048\n'
                                      f'[models.c]\nmodel = "smollm2"\nctx = 2048\n'
                                      f'chat_template = """{PLAIN}"""\n')
    b, c = registry.get("b"), registry.get("c")
    assert isinstance(c, NameView) and c.base is b and c.card.n_ctx == 2048


def test_one_engine_with_two_lifetimes_is_refused_naming_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = ('[models.first]\nmodel = "smollm2"\nkeep_alive = -1\n'
            '[models.second]\nmodel = "smollm2"\nload = "demand"\nkeep_alive = "2m"\n')
    with pytest.raises(ValueError, match="'first' and 'second'"):
        serve_config(tmp_path, text)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["serve", "--config", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "first" in err and "second" in err and "keep_alive" in err


def test_a_bad_template_of_a_second_name_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid chat template 'b'"):
        serve_config(tmp_path, '[models.a]\nmodel = "smollm2"\nparallel = 2\n'
                               '[models.b]\nmodel = "smollm2"\nparallel = 2\n'
                               'chat_template = "{% for %}"\n')


def test_library_names_of_a_served_file_join_its_engine() -> None:
    registry = ModelRegistry()
    path = resolve("smollm2").path
    first = registry.add_managed(inspect("mine", path, "config"), EngineSettings(n_ctx=1024),
                                 at_start=True)
    # The models directory lists the same file: an alias, whatever the server's settings.
    listed = registry.add_managed(inspect("smollm2-file", path, "dir"), EngineSettings())
    assert listed is first
    # An Ollama tag of the same blob with its own Modelfile defaults and system prompt.
    tag = replace(inspect("tuned:latest", path, "ollama"), defaults={"temperature": 0.3},
                  system="Answer in French.", n_ctx=4096)
    view = registry.add_managed(tag, EngineSettings(n_ctx=4096))
    assert isinstance(view, NameView) and view.base is first
    assert view.system == "Answer in French." and dict(view.card.defaults) == {"temperature": 0.3}
    assert view.card.n_ctx == 1024 and len(registry.manager.models) == 1


def test_app_resources_of_one_file() -> None:
    registry = ModelRegistry()
    a = registry.add("a", "/nonexistent/tiny.gguf", EngineSettings())
    assert registry.add("a2", "/nonexistent/tiny.gguf", EngineSettings()) is a
    b = registry.add("b", "/nonexistent/tiny.gguf", EngineSettings(chat_template=PLAIN))
    assert isinstance(b, NameView) and b.base is a
    c = registry.add("c", "/nonexistent/tiny.gguf", EngineSettings(parallel=2))
    assert isinstance(c, ModelService) and c is not a
    assert [s.name for s in registry] == ["a", "b", "c"]


@dataclass
class TemplatedInfo(StubInfo):
    chat_template: str | None = None
    n_ctx_train: int = 4096
    n_params: int = 0
    n_vocab: int = 0x110000
    n_layer: int = 1
    size_bytes: int = 0


def loaded_engine(template: str) -> tuple[ModelRegistry, ModelService]:
    """A registered engine that looks loaded: the stub vocabulary, its own template."""
    registry = ModelRegistry()
    engine = registry.add("a", "/nonexistent/tiny.gguf", EngineSettings(n_ctx=4096))
    assert isinstance(engine, ModelService)
    model = StubModel()
    model.info = TemplatedInfo(chat_template=template)
    engine.model, engine.state, engine.n_ctx = model, "ready", 4096  # type: ignore[assignment]
    engine.template = ChatTemplate(template, name="a")
    return registry, engine


def test_a_view_renders_with_its_own_template() -> None:
    registry, engine = loaded_engine(PLAIN)
    view = registry.add("b", "/nonexistent/tiny.gguf",
                        EngineSettings(n_ctx=4096, chat_template=SHOUT))
    assert isinstance(view, NameView)
    messages = [ChatMessage(role="user", content="hi")]
    assert engine.render_chat(messages) == "user: hi\n"
    assert view.render_chat(messages) == "HI!"
    request = GenerationRequest(model="b", messages=messages)
    assert view.prepare(request).text == "HI!"
    assert engine.prepare(replace(request, model="a")).text == "user: hi\n"
    assert view.card.chat_template == SHOUT and engine.card.chat_template == PLAIN


def test_a_view_without_an_override_renders_with_the_models_own_template() -> None:
    registry, engine = loaded_engine(PLAIN)
    engine.settings = replace(engine.settings, chat_template=SHOUT)
    engine.template = ChatTemplate(SHOUT, name="a")  # the engine's name overrides it
    own = registry.add("b", "/nonexistent/tiny.gguf", EngineSettings(n_ctx=4096))
    assert isinstance(own, NameView)
    messages = [ChatMessage(role="user", content="hi")]
    assert engine.render_chat(messages) == "HI!"
    assert own.render_chat(messages) == "user: hi\n" and own.card.chat_template == PLAIN


def test_a_view_reads_the_output_with_its_own_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, engine = loaded_engine(PLAIN)
    view = registry.add("b", "/nonexistent/tiny.gguf", EngineSettings(n_ctx=4096,
                                                                    chat_template=THINK_TEMPLATE))
    assert isinstance(view, NameView)
    monkeypatch.setattr(engine, "submit", lambda request, prepared: ScriptedGeneration(
        script(["mulling", "</think>", "hello"])))
    messages = [ChatMessage(role="user", content="hi")]

    async def channels(backend: ModelService | NameView, name: str) -> dict[str, str]:
        out: dict[str, str] = {}
        async for steps in backend.start(GenerationRequest(model=name, messages=messages)):
            for step in steps:
                for event in step.events:
                    if isinstance(event, TextDelta):
                        out[event.channel] = out.get(event.channel, "") + event.text
        return out

    assert asyncio.run(channels(view, "b")) == {"reasoning": "mulling", "output": "hello"}
    # The engine's own name has no think tags in its template: all of it is the answer.
    assert asyncio.run(channels(engine, "a")) == {"output": "mulling</think>hello"}
