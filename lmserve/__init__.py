"""lmserve: serve GGUF language models locally, fast, in the API dialects clients speak."""

from typing import Any

from lmserve._version import __version__

__all__ = ["App", "LLMResource", "run", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import lmserve` (the CLI, --version) stays light.
    if name == "App":
        from lmserve.app import App
        return App
    if name == "LLMResource":
        from lmserve.models.resource import LLMResource
        return LLMResource
    if name == "run":
        from lmserve.app import run
        return run
    raise AttributeError(f"module 'lmserve' has no attribute {name!r}")
