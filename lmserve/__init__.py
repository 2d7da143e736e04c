"""lmserve: serve GGUF language models locally, fast, in the API dialects clients speak."""

__version__ = "0.1.0"
