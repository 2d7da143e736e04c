"""LoRA adapters: the configured ones (LoraSpec) and a request's choice among them.

Adapters are loaded when the model loads and chosen per request by alias (or by the
path of a loaded adapter), either through the model name ("smollm2:alias") or a field
of the request. The engine sees the choice as an adapter set, ((path, scale), ...):
sequences with equal sets share KV, prefixes and decode steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmserve.core.errors import invalid

AdapterSet = tuple[tuple[str, float], ...]  # ((path, scale), ...) sorted by path; () = base


@dataclass(frozen=True)
class LoraSpec:
    """An adapter loaded at start-up: served as "<model>:<alias>" and by `lora` fields."""

    alias: str
    path: str
    scale: float = 1.0  # the scale used unless a request gives its own
    model: str | None = None  # the served model it adapts; None: the first model

    def __post_init__(self) -> None:
        if not self.alias or ":" in self.alias or "/" in self.alias:
            raise ValueError(f"LoRA alias {self.alias!r} must be non-empty, without ':' or '/'")
        if not self.path:
            raise ValueError(f"LoRA '{self.alias}' needs a path")
        if not math.isfinite(self.scale):
            raise ValueError(f"LoRA '{self.alias}' scale must be a finite number")


@dataclass(frozen=True)
class LoraRef:
    name: str  # an alias, or the path of a loaded adapter
    scale: float | None = None  # None: the adapter's configured scale


@dataclass(frozen=True)
class LoraSelection:
    """The adapters a request asks for; `param` names the request field in errors."""

    refs: tuple[LoraRef, ...]
    param: str = "lora"


# -- configuration --------------------------------------------------------------------------
def parse_spec(text: str) -> LoraSpec:
    """`ALIAS=PATH[:SCALE]` (the --lora flag). A suffix that is not a number stays in the path."""
    alias, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"--lora {text!r}: expected ALIAS=PATH[:SCALE]")
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    return LoraSpec(alias=alias.strip(), path=path, scale=scale)


def spec_from_entry(entry: Any, where: str) -> LoraSpec:
    """A config file entry: {"alias"?, "path", "scale"?, "model"?} or an ALIAS=PATH string."""
    if isinstance(entry, str):
        return parse_spec(entry)
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected {{alias, path, scale}} or 'ALIAS=PATH[:SCALE]'")
    unknown = set(entry) - {"alias", "name", "path", "scale", "model"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    path = str(entry.get("path") or "")
    # no alias: the file's name without .gguf (seed 003's entries name none)
    alias = entry.get("alias") or entry.get("name") or os.path.basename(path).removesuffix(".gguf")
    try:
        scale = float(entry.get("scale", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"{where}.scale must be a number") from None
    model = entry.get("model")
    return LoraSpec(alias=str(alias or ""), path=path, scale=scale,
                    model=str(model) if model else None)


def parse_specs(value: Any) -> tuple[LoraSpec, ...]:
    """The `loras` setting: a list of entries (flags give strings, files give objects)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    specs = tuple(spec_from_entry(item, f"loras[{i}]") for i, item in enumerate(items))
    check_unique(specs)
    return specs


def check_unique(specs: Iterable[LoraSpec]) -> None:
    seen: set[tuple[str | None, str]] = set()
    for spec in specs:
        key = (spec.model, spec.alias)
        if key in seen:
            raise ValueError(f"LoRA alias '{spec.alias}' is configured twice")
        seen.add(key)


def assign(specs: Sequence[LoraSpec], models: Sequence[str]) -> dict[str, tuple[LoraSpec, ...]]:
    """Which served model loads which adapters: the named one, else the first model."""
    for spec in specs:
        check_file(spec)
    unknown = sorted({s.model for s in specs if s.model is not None and s.model not in models})
    if unknown:
        raise ValueError(f"LoRA adapters name model(s) not served: {', '.join(unknown)} "
                         f"(served: {', '.join(models)})")
    first = models[0] if models else None
    return {name: tuple(s for s in specs if (s.model or first) == name) for name in models}


def check_file(spec: LoraSpec) -> None:
    if not os.path.isfile(spec.path):
        raise ValueError(f"LoRA adapter '{spec.alias}': no such file {spec.path!r}")


# -- requests -------------------------------------------------------------------------------
def selection_field(value: Any, param: str) -> LoraSelection | None:
    """A request's LoRA field: "alias", {"name", "scale"?}, or a list of those; null: none."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    refs = tuple(_ref(item, f"{param}[{i}]" if isinstance(value, list) else param)
                 for i, item in enumerate(items))
    return LoraSelection(refs, param=param)


def _ref(item: Any, where: str) -> LoraRef:
    if isinstance(item, str) and item:
        return LoraRef(item)
    if not isinstance(item, Mapping):
        raise invalid(f"'{where}' must be an adapter name or {{\"name\", \"scale\"}}", param=where)
    name = item.get("name", item.get("alias"))
    if not isinstance(name, str) or not name:
        raise invalid(f"'{where}.name' must name a loaded LoRA adapter", param=f"{where}.name")
    unknown = set(item) - {"name", "alias", "scale"}
    if unknown:
        raise invalid(f"'{where}' has unknown key(s) {', '.join(sorted(unknown))}", param=where)
    scale = item.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise invalid(f"'{where}.scale' must be a finite number", param=f"{where}.scale")
    return LoraRef(name, float(scale) if scale is not None else None)


def model_spec(model: str | None, specs: Sequence[LoraSpec],
               own_names: Iterable[str] = ()) -> LoraSpec | None:
    """The adapter a model name selects ("smollm2:alias"), or None."""
    if not model or model in own_names:
        return None
    base, colon, alias = model.rpartition(":")
    if not (colon and base):
        return None
    return next((s for s in specs if s.alias == alias), None)


def resolve(specs: Sequence[LoraSpec], model: str | None, selection: LoraSelection | None,
            own_names: Iterable[str] = ()) -> AdapterSet:
    """The adapter set a request runs under. Zero scales drop out (they change nothing), and
    the set is sorted, so equal choices batch and share prefixes however they were spelled."""
    spec = model_spec(model, specs, own_names)
    implied = spec.alias if spec is not None else None
    if implied is not None and selection is not None and selection.refs:
        raise invalid(f"the model '{model}' already selects the LoRA adapter '{implied}'; "
                      f"send the base model name with '{selection.param}', or only the model",
                      param=selection.param)
    refs = (LoraRef(implied),) if implied is not None else \
        (selection.refs if selection is not None else ())
    param = selection.param if selection is not None else "model"
    chosen: dict[str, float] = {}
    for ref in refs:
        spec = _find(specs, ref.name, param)
        if spec.path in chosen:
            raise invalid(f"the LoRA adapter '{ref.name}' is given twice", param=param)
        chosen[spec.path] = spec.scale if ref.scale is None else ref.scale
    return tuple(sorted((path, scale) for path, scale in chosen.items() if scale != 0.0))


def _find(specs: Sequence[LoraSpec], name: str, param: str) -> LoraSpec:
    for spec in specs:
        if spec.alias == name:
            return spec
    for spec in specs:
        if spec.path == name:
            return spec
    loaded = ", ".join(s.alias for s in specs) or "none"
    raise invalid(f"unknown LoRA adapter '{name}' (loaded: {loaded})", param=param,
                  code="lora_not_found")


def describe(adapters: AdapterSet, specs: Sequence[LoraSpec]) -> str:
    """A short label for an adapter set (metrics): "base", "alias" or "a+b@0.5"."""
    if not adapters:
        return "base"
    parts = []
    for path, scale in adapters:
        exact = next((s for s in specs if s.path == path and s.scale == scale), None)
        same_file = next((s for s in specs if s.path == path), None)
        if exact is not None:
            parts.append(exact.alias)
        else:
            parts.append(f"{same_file.alias if same_file else path}@{scale:g}")
    return "+".join(parts)
