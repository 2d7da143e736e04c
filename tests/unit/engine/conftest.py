"""Fixtures the engine's unit tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def model(tmp_path: Path) -> str:
    """A stand-in model file: the disk and RAM caches key their states by its path and size."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake weights")
    return str(path)
