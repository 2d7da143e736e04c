"""Finding models for the oLLM routes: served ones by name, alias or file; any other reference
through lmserve's resolver, which here never downloads; and what their GGUF headers say."""

from __future__ import annotations

import os
from typing import Any

from lmserve.core.backend import ModelBackend
from lmserve.core.errors import ErrorKind, LmserveError, invalid, unsupported
from lmserve.dialects.ollm import encoder
from lmserve.dialects.ollm.plan import Target
from lmserve.models.gguf_header import GGUFError, GGUFHeader, read_header
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import BUNDLED, ResolvedModel, resolve

PARAM = "runtime.model_reference"
CATALOG = (*BUNDLED, "gemma3-270m")


def served(registry: ModelRegistry, ref: str | None) -> tuple[ModelBackend, str]:
    """The served model a reference names (a served name or alias, or a served file's path),
    and the name to report it under."""
    if ref is None and len(registry) != 1:
        raise invalid(f"{PARAM} is required: this server serves {_names(registry)}",
                      param=PARAM, code="missing_required_parameter")
    try:
        service = registry.get(ref)
    except LmserveError as exc:
        if exc.kind is not ErrorKind.MODEL_NOT_FOUND or ref is None:
            raise
        found = _served_file(registry, ref)
        if found is None:
            raise LmserveError(ErrorKind.MODEL_NOT_FOUND, f"'{ref}' is not served by this "
                               f"server (it serves {_names(registry)}); POST /v1/plan plans "
                               "any GGUF reference", param=PARAM, code="model_not_found") from None
        service = found
    names = registry.names(service)
    return service, ref if ref in names else names[0]


def _names(registry: ModelRegistry) -> str:
    return ", ".join(n for s in registry for n in registry.names(s)) or "no models"


def _served_file(registry: ModelRegistry, ref: str) -> ModelBackend | None:
    try:
        path = os.path.realpath(resolve_local(ref).path)
    except LmserveError:
        return None
    return next((s for s in registry if _served_path(s) == path), None)


def _served_path(service: ModelBackend) -> str | None:
    """The real path of the GGUF file a backend serves; None for an upstream's model."""
    card = service.card
    return os.path.realpath(card.source) if card.kind != "upstream" else None


def resolve_local(ref: str) -> ResolvedModel:
    """A GGUF path or bundled name; an hf:// reference is not fetched from here."""
    if ref.startswith("hf://"):
        raise unsupported(PARAM, "planning and inspection read a local GGUF header and never "
                          "download; pass the downloaded file's path, or serve the model")
    return resolve(ref)


def header(path: str) -> GGUFHeader:
    try:
        return read_header(path)
    except (GGUFError, OSError) as exc:
        raise invalid(f"cannot read the GGUF header of {path}: {exc}", param=PARAM) from None


def plan_target(registry: ModelRegistry, ref: str | None
                ) -> tuple[Target, GGUFHeader, ModelBackend | None]:
    try:
        service, name = served(registry, ref)
    except LmserveError as exc:
        if exc.kind is not ErrorKind.MODEL_NOT_FOUND or ref is None:
            raise
        found = resolve_local(ref)
        target = Target(reference=ref, name=found.name, source=found.source, path=found.path)
        return target, header(found.path), None
    card = service.card
    if card.kind == "upstream":
        raise unsupported(PARAM, f"'{name}' is served by an upstream server ({card.source}); "
                          "a plan sizes a local GGUF file")
    # The card has no layer or head counts: the plan reads them from the served file's header.
    target = Target(reference=ref or name, name=name, source="served", path=card.source,
                    served_as=name, loaded=card.ready)
    return target, header(card.source), service


# -- discovery entries -------------------------------------------------------------------------

def served_entry(registry: ModelRegistry, service: ModelBackend,
                 reference: str | None = None) -> dict[str, Any]:
    names, card = registry.names(service), service.card
    # Quantization, size label and the file's own template are not on the card: the header's.
    local = card.kind != "upstream"  # the source is a GGUF path, not an upstream's URL
    runtime = {**(_header_facts(card.source) if local else {"architecture": None}),
               "served_as": names[0], "aliases": names[1:],
               "state": card.state.value, "loaded": card.ready, "error": card.error,
               "context_length": card.n_ctx or None, "parallel": card.parallel,
               "threads": card.threads,
               "parameters": card.weights.n_params if card.weights else None}
    return encoder.model_entry(reference=reference or names[0], name=names[0], source="served",
                               path=card.source, materialized=local and os.path.isfile(card.source),
                               discovery_source="served", runtime=runtime)


def catalog_entries(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Bundled models this server does not serve, installed or not."""
    served_paths = {_served_path(s) for s in registry}
    out = []
    for name in CATALOG:
        try:
            path = resolve(name).path
        except LmserveError:
            path = ""
        if path and os.path.realpath(path) in served_paths:
            continue
        out.append(_resolved_entry(name, name, "bundled", path, "built-in"))
    return out


def reference_entry(registry: ModelRegistry, ref: str) -> dict[str, Any]:
    try:
        service, _ = served(registry, ref)
    except LmserveError as exc:
        if exc.kind is not ErrorKind.MODEL_NOT_FOUND:
            raise
        found = resolve_local(ref)
        return _resolved_entry(ref, found.name, found.source, found.path, "resolved")
    return served_entry(registry, service, ref)


def _resolved_entry(ref: str, name: str, source: str, path: str,
                    discovery: str) -> dict[str, Any]:
    runtime = {**(_header_facts(path) if path else {}), "served_as": None, "loaded": False}
    return encoder.model_entry(reference=ref, name=name, source=source, path=path,
                               materialized=bool(path) and os.path.isfile(path),
                               discovery_source=discovery, runtime=runtime)


def _header_facts(path: str) -> dict[str, Any]:
    try:
        h = read_header(path)
    except (GGUFError, OSError):
        return {"architecture": None}
    return {"architecture": h.architecture, "context_length_train": h.context_length,
            "quantization": h.quantization, "size_bytes": h.size_bytes,
            "size_label": h.metadata.get("general.size_label"),
            "chat_template": h.chat_template is not None}
