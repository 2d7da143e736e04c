"""The framework API: an ASGI App whose models are registered in code.

    app = App(openapi={"info": {"title": "Generative AI API"}}, docs="/docs/")
    app.models.add_model(path="/llm/", model="model.gguf", name="assistant",
                         serving=("native", "openai"), params={"temperature": 0.7})

    @app.models.model_resource("/coder/")
    class Coder(LLMResource):
        name = "coder"
        model_path = "coder.gguf"
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

from lmserve.http.app import StoreSettings, build_app, mount_resource, stream_retention
from lmserve.models.registry import ModelRegistry
from lmserve.models.resource import LLMResource
from lmserve.service import EngineSettings

R = TypeVar("R", bound=type[LLMResource])


class Models:
    """`app.models`: registration is cheap (the GGUF header only); weights load at startup."""

    def __init__(self, app: App) -> None:
        self._app = app

    def add_model(self, path: str, model: str, name: str, *,
                  serving: Iterable[str] | str | None = None, params: dict[str, Any] | None = None,
                  verbose_name: str | None = None, heartbeat_interval: float | None = None,
                  settings: EngineSettings | None = None) -> LLMResource:
        attributes: dict[str, Any] = {"params": dict(params or {})}
        if serving is not None:
            attributes["serving"] = (serving,) if isinstance(serving, str) else tuple(serving)
        if verbose_name is not None:
            attributes["verbose_name"] = verbose_name
        if heartbeat_interval is not None:
            attributes["heartbeat_interval"] = heartbeat_interval
        resource = LLMResource.build(path, name=name, model_path=_resolve(model), **attributes)
        return self.add_resource(resource, settings=settings)

    def model_resource(self, path: str, *, settings: EngineSettings | None = None
                       ) -> Callable[[R], R]:
        """Class decorator: register an LLMResource subclass at `path`."""

        def register(cls: R) -> R:
            self.add_resource(cls(path), settings=settings)
            return cls

        return register

    def add_resource(self, resource: LLMResource, *,
                     settings: EngineSettings | None = None) -> LLMResource:
        resource.attach(self._app.registry, settings or self._app.settings)
        mount_resource(self._app.asgi, resource)
        return resource

    @property
    def resources(self) -> list[LLMResource]:
        return list(self._app.asgi.state.lmserve.resources)


class App:
    """An ASGI application serving the models registered on `app.models`."""

    def __init__(self, *, openapi: dict[str, Any] | None = None, docs: str | None = "/docs/",
                 redoc: str | None = "/redoc/", settings: EngineSettings | None = None,
                 store: str | None = None, data_dir: str | Path | None = None,
                 api_keys: Iterable[str] = (), load_on_startup: bool = True,
                 stream_ttl: float = 600.0) -> None:
        self.registry = ModelRegistry()
        self.settings = settings or EngineSettings()
        self.asgi = build_app(self.registry, api_keys=tuple(api_keys),
                              load_on_startup=load_on_startup,
                              store=StoreSettings(url=store, data_dir=data_dir,
                                                  retention=stream_retention(stream_ttl)),
                              openapi=openapi, docs=docs, redoc=redoc)
        self.models = Models(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)


def _resolve(model: str) -> str:
    """A file path as given, or a reference the model resolver knows (smollm2, hf://...)."""
    if Path(model).exists():
        return str(Path(model).resolve())
    from lmserve.models.resolve import resolve
    return resolve(model).path


def run(app: App | str, *, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    """Serve an App (or an "module:attribute" reference to one) with uvicorn. Logging is
    lmserve's text format unless the caller configured the root logger already; lmserve's
    access line replaces uvicorn's."""
    import logging

    import uvicorn

    from lmserve.http.observe import configure_logging

    target = load_app(app) if isinstance(app, str) else app
    if not logging.getLogger().handlers:
        configure_logging(log_level)
    uvicorn.run(target, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                log_config=None, access_log=False)


def load_app(reference: str) -> App:
    """Import "package.module:attribute" (the attribute defaults to `app`)."""
    import importlib

    module_name, _, attribute = reference.partition(":")
    module = importlib.import_module(module_name)
    target = getattr(module, attribute or "app", None)
    if not isinstance(target, App):
        raise ValueError(f"{reference}: no App at attribute {attribute or 'app'!r}")
    return target
