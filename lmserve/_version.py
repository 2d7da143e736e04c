"""lmserve's version, in a leaf module: anything may import it without importing the package's
lazy exports (`lmserve/__init__.py` re-exports it). Keep it equal to pyproject.toml's."""

__version__ = "0.1.0"
