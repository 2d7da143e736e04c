"""The chat page's JavaScript modules under Node's test runner: tests/unit/js/test_*.mjs (the
Server-Sent Events parser, the native protocol client). Skipped where Node is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

JS_TESTS = sorted((Path(__file__).parent / "js").glob("test_*.mjs"))


def test_there_are_js_tests():
    assert {p.name for p in JS_TESTS} >= {"test_sse.mjs", "test_api.mjs"}


@pytest.mark.parametrize("path", JS_TESTS, ids=lambda p: p.name)
def test_js(path: Path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    result = subprocess.run([node, "--test", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
