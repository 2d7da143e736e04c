"""LLMResource: one model mounted at a URL path, with its dialects and default parameters."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from lmserve.chat.overflow import OVERFLOW_POLICIES
from lmserve.core import observe
from lmserve.core.backend import ModelBackend
from lmserve.core.errors import invalid
from lmserve.core.lora import selection_field
from lmserve.core.request import SAMPLING_DEFAULTS, FieldNames, SamplingParams
from lmserve.models.gguf_header import GGUFHeader, read_header
from lmserve.models.registry import ModelRegistry

# Default generation parameters a resource may carry (core.request.DEFAULTABLE, by their
# neutral names); each request may override them (core.request.with_defaults).
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "min_p": (int, float),
    "max_tokens": (int,), "seed": (int,), "stop": (str, list), "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "repetition_penalty": (int, float), "reasoning": (bool,),
    "context_overflow": (str,),  # error | truncate (lmserve.chat.overflow)
}
# Only a request may carry these: a default would reach the dialects that have no such field.
REQUEST_PARAMS: dict[str, tuple[type, ...]] = {
    "lora": (str, list, dict),  # LoRA adapter alias(es), or {"name", "scale"} (core.lora)
}
RESERVED = ("reasoning",)  # lifted onto the resource, not a sampling parameter


def check_params(params: Mapping[str, Any], *, where: str = "params",
                 request: bool = False) -> dict[str, Any]:
    """Validate default (or, with request=True, a request's) generation parameters; unknown
    keys are errors, not ignored."""
    if not isinstance(params, Mapping):
        raise invalid(f"'{where}' must be an object", param=where)
    out: dict[str, Any] = {}
    for key, value in params.items():
        types = PARAM_TYPES.get(key) or (REQUEST_PARAMS.get(key) if request else None)
        if key in REQUEST_PARAMS and not request:
            raise invalid(f"'{key}' is chosen per request; it cannot be a default",
                          param=f"{where}.{key}")
        if types is None:
            known = ", ".join(PARAM_TYPES)
            raise invalid(f"unknown generation parameter '{key}' (known: {known})",
                          param=f"{where}.{key}")
        if value is None:
            continue
        bad_bool = isinstance(value, bool) and bool not in types
        if bad_bool or not isinstance(value, types):
            raise invalid(f"'{where}.{key}' has the wrong type", param=f"{where}.{key}")
        if key == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
            raise invalid(f"'{where}.stop' must be a string or a list of strings",
                          param=f"{where}.stop")
        if key == "lora":
            selection_field(value, f"{where}.lora")  # its shape; the aliases at request time
        if key == "context_overflow" and value not in OVERFLOW_POLICIES:
            raise invalid(f"'{where}.context_overflow' must be 'error' or 'truncate'",
                          param=f"{where}.context_overflow")
        out[key] = value
    if not request:  # a request's own values are checked where its dialect reads them
        _check_bounds(out, where)
    return out


def _check_bounds(params: Mapping[str, Any], where: str) -> None:
    """Defaults that make no sense are refused when they are set, as a request's would be."""
    SamplingParams(**{k: params[k] for k in SAMPLING_DEFAULTS if k in params}
                   ).check(FieldNames(f"{where}."))
    if params.get("max_tokens", 1) < 1:
        raise invalid(f"'{where}.max_tokens' must be at least 1", param=f"{where}.max_tokens")


class LLMResource:
    """A model served at `path`. Subclass it (class attributes) or build one with add_model."""

    name: ClassVar[str] = ""
    verbose_name: ClassVar[str | None] = None
    model_path: ClassVar[str] = ""
    # The dialects served under the path, by their names in lmserve.http.dialects (checked
    # when the resource is mounted); None: every dialect a resource can serve.
    serving: ClassVar[tuple[str, ...] | None] = None
    reasoning: ClassVar[bool] = False
    heartbeat_interval: ClassVar[float] = 15.0
    params: ClassVar[dict[str, Any]] = {}
    _header_optional: ClassVar[bool] = False  # the registry already holds the model

    def __init__(self, path: str | None = None) -> None:
        self.path = _normalise_path(path or str(getattr(self, "path", "/")))
        if not self.name:
            raise ValueError(f"{type(self).__name__}: a resource needs a name")
        if not self.model_path:
            raise ValueError(f"{type(self).__name__}: a resource needs a model_path")
        self.dialects: tuple[str, ...] | None = \
            tuple(self.serving) if self.serving is not None else None
        params = dict(self.params)
        self.reasoning_default = bool(params.pop("reasoning", self.reasoning))
        self._lock = threading.Lock()
        self._defaults = check_params(params)
        # Registration reads only the header: architecture, context, template, size.
        self.header: GGUFHeader | None = None
        try:
            self.header = read_header(self.model_path)
        except (OSError, ValueError):
            if not self._header_optional:
                raise
        self.service: ModelBackend | None = None

    # -- defaults: read by every request, replaced by PUT -------------------------------------
    @property
    def defaults(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._defaults)

    def set_defaults(self, params: Mapping[str, Any]) -> dict[str, Any]:
        checked = check_params(params)
        reasoning = checked.pop("reasoning", None)
        with self._lock:
            self._defaults = checked
            if reasoning is not None:
                self.reasoning_default = reasoning
        return self.defaults

    @property
    def title(self) -> str:
        return self.verbose_name or self.name

    @property
    def default_transport(self) -> str:
        card = self.service.card if self.service is not None else None
        if card is not None and card.ready:
            has_template = card.has_template
        else:
            has_template = self.header is not None and self.header.chat_template is not None
        return "chat" if has_template else "raw"

    @classmethod
    def build(cls, path: str, *, name: str, model_path: str, **attributes: Any) -> LLMResource:
        """A resource from arguments instead of a subclass (what add_model uses)."""
        unknown = set(attributes) - {"verbose_name", "serving", "reasoning",
                                     "heartbeat_interval", "params"}
        if unknown:
            raise TypeError(f"unknown resource attribute(s): {', '.join(sorted(unknown))}")
        if "serving" in attributes and isinstance(attributes["serving"], str):
            attributes["serving"] = (attributes["serving"],)
        namespace = {"name": name, "model_path": model_path, **attributes}
        resource: LLMResource = type(f"{cls.__name__}[{name}]", (cls,), namespace)(path)
        return resource

    @classmethod
    def for_service(cls, service: ModelBackend, path: str,
                    serving: tuple[str, ...] = ("native",)) -> LLMResource:
        """A resource over a model the registry already holds (`lmserve serve`)."""
        probe = type(f"{cls.__name__}[{service.name}]", (cls,),
                     {"name": service.name, "model_path": service.card.source, "serving": serving,
                      "_header_optional": True})
        resource: LLMResource = probe(path)
        resource.service = service
        return resource

    def attach(self, registry: ModelRegistry, settings: Any) -> ModelBackend:
        self.service = registry.add(self.name, self.model_path, settings)
        return self.service

    def models(self) -> ResourceModels:
        return ResourceModels(self)


class ResourceModels:
    """The registry as one resource's dialects see it: its single model under any name.

    Under a resource path the model is implied by the URL, so a client's `model` field
    (which vendor clients always send) selects nothing; lists show the resource's name.
    """

    def __init__(self, resource: LLMResource) -> None:
        self.resource = resource

    @property
    def defaults(self) -> dict[str, Any]:
        return self.resource.defaults

    def _service(self) -> ModelBackend:
        assert self.resource.service is not None, "resource is not attached to an app"
        return self.resource.service

    def get(self, name: str | None) -> ModelBackend:
        service = self._service()
        observe.note_model(service.name)
        return service

    def names(self, service: ModelBackend) -> list[str]:
        return [self.resource.name]

    def __iter__(self) -> Iterator[ModelBackend]:
        return iter([self._service()])

    def __len__(self) -> int:
        return 1


def _normalise_path(path: str) -> str:
    path = "/" + path.strip("/")
    return path if path == "/" else path + "/"
