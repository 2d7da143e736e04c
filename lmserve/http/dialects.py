"""The dialect registry: which API dialects exist, where each is mounted, and how its router is
built. A new dialect is one `register(...)` call here (or in an application), not edits in the
app assembly or the resource model.

Each dialect has a router factory for the server root (routing by the request's `model` field
over the whole registry) and/or one for a resource (one model at a path, under `prefix`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from fastapi import APIRouter

from lmserve.dialects.anthropic.routes import make_router as anthropic_router
from lmserve.dialects.native.producer import StreamProducers
from lmserve.dialects.native.routes import make_router as native_router
from lmserve.dialects.ollama.routes import make_router as ollama_router
from lmserve.dialects.ollm.routes import make_router as ollm_router
from lmserve.dialects.openai.routes import make_router as openai_router
from lmserve.dialects.sglang.routes import make_router as sglang_router
from lmserve.models.resource import LLMResource


class MountContext(Protocol):
    """What a resource's router may use of the app besides its model (http.app.AppState)."""

    @property
    def producers(self) -> StreamProducers: ...


# (the model view the routes see, their OpenAPI tags) -> router
ModelsRouter = Callable[..., APIRouter]
# (the resource, the app's mount context, tags) -> router
ResourceRouter = Callable[[LLMResource, MountContext, list[str | Enum]], APIRouter]


@dataclass(frozen=True)
class Dialect:
    name: str
    root: ModelsRouter | None = None  # mounted at the server root by `lmserve serve`
    resource: ResourceRouter | None = None  # mounted under a resource's path
    prefix: str = ""  # the mount point relative to the resource path ("" : the path itself)
    order: int = 0  # root routers are included in this order (a path two dialects share
    #                 goes to the one included first)


_DIALECTS: dict[str, Dialect] = {}


def register(dialect: Dialect) -> Dialect:
    """Add (or replace) a dialect; resources may then name it in `serving`."""
    _DIALECTS[dialect.name] = dialect
    return dialect


def get(name: str) -> Dialect:
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; choose from {tuple(resource_dialects())}")\
            from None


def resource_dialects() -> Iterator[str]:
    """The dialects a resource can serve, in registration order."""
    return (d.name for d in _DIALECTS.values() if d.resource is not None)


def root_dialects() -> list[Dialect]:
    return sorted((d for d in _DIALECTS.values() if d.root is not None), key=lambda d: d.order)


def _by_models(factory: ModelsRouter) -> ResourceRouter:
    def build(resource: LLMResource, context: MountContext, tags: list[str | Enum]) -> APIRouter:
        return factory(resource.models, tags=tags)
    return build


def _native(resource: LLMResource, context: MountContext, tags: list[str | Enum]) -> APIRouter:
    return native_router(resource, context.producers, tags=tags)


register(Dialect("native", resource=_native, prefix=""))
# OpenAI last at the root, so the documented GET /v1/models there is OpenAI's.
register(Dialect("openai", root=openai_router, resource=_by_models(openai_router),
                 prefix="openai", order=1))
register(Dialect("anthropic", root=anthropic_router, resource=_by_models(anthropic_router),
                 prefix="anthropic"))
register(Dialect("ollama", root=ollama_router, resource=_by_models(ollama_router),
                 prefix="ollama"))
register(Dialect("sglang", root=sglang_router))
register(Dialect("ollm", root=ollm_router))
