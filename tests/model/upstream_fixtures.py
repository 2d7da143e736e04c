"""The upstream variant of the client tests: a front lmserve that serves "smollm2" from the
shared `server` over `--upstream`, so the same tests run against a local model and an
upstream-backed one.

A test module opts in with `pytestmark = pytest.mark.upstream_variant`; then every test in it
whose fixtures depend on `target` runs twice, `[local]` and `[upstream]` (the client fixtures
take `target` where they took `server`). `@pytest.mark.local_only("reason")` keeps a test to
the local model where it needs what an upstream cannot give (token ids, the GGUF's facts,
lmserve's own prefix cache); the upstream run is then skipped with the reason.
`@pytest.mark.upstream_gap("reason")` marks a known, fixable shortfall of the upstream run
(a strict xfail there, so the mark must go once it is fixed).
Imported by conftest.py, which makes these fixtures and hooks its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.model.conftest import Server

TARGETS = ("local", "upstream")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "upstream_variant: tests taking `target` run against "
                            "the local model and an upstream-backed front (tests/model/"
                            "upstream_fixtures.py)")
    config.addinivalue_line("markers", "local_only(reason): a test of an upstream_variant "
                            "module that cannot apply to an upstream-backed model")
    config.addinivalue_line("markers", "upstream_gap(reason): a test of an upstream_variant "
                            "module that the upstream-backed model fails for a known reason "
                            "that can be fixed (strict xfail there: it must start passing)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" in metafunc.fixturenames and \
            metafunc.definition.get_closest_marker("upstream_variant") is not None:
        metafunc.parametrize("target", TARGETS, indirect=True)


@pytest.fixture(scope="session")
def upstream_front(server: Server, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    """`lmserve serve --upstream smollm2=<server>/v1`: no model of its own."""
    from tests.model.conftest import start_server, stop_server

    tmp = str(tmp_path_factory.mktemp("upstream-front"))
    front = start_server(tmp, "--upstream", f"smollm2={server.base_url}", "--data-dir", tmp)
    yield front
    stop_server(front)


@pytest.fixture()
def target(request: pytest.FixtureRequest, server: Server) -> Server:
    """The server a client test talks to: the local one, or the upstream-backed front."""
    which = getattr(request, "param", "local")
    if which == "local":
        return server
    marker = request.node.get_closest_marker("local_only")
    if marker is not None:
        pytest.skip(f"local model only: {marker.args[0] if marker.args else ''}")
    gap = request.node.get_closest_marker("upstream_gap")
    if gap is not None:
        request.node.add_marker(pytest.mark.xfail(reason=gap.args[0], strict=True))
    front: Server = request.getfixturevalue("upstream_front")
    return front


def llama_server_binary() -> str | None:
    """A llama-server to use as an upstream: $LLAMA_SERVER, on PATH, or the peers' build
    (benchmarks/peers, under ~/.cache); None when there is none."""
    import glob
    import shutil

    candidates = [os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"),
                  *sorted(glob.glob(os.path.expanduser("~/.cache/**/bin/llama-server"),
                                    recursive=True))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)
