"""Which vision projector (mmproj GGUF) belongs to which model: by name, by a folder of one
model's own (llama-server's router layout), by a Hugging Face repository's files, by an
Ollama manifest's projector layer; a stray projector is attached to no model and named in the
log. Tiny GGUF files: the library reads only their headers and names."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lmserve.models.library import projector_for, scan_dir, scan_hf_cache, scan_ollama
from lmserve.models.projectors import is_projector, match
from tests.unit.models.test_library import by_name, make_hf_cache, make_ollama_store, tiny_gguf


def names(chosen: list[Path | None]) -> list[str | None]:
    return [p.name if p is not None else None for p in chosen]


def test_a_projector_is_not_a_model() -> None:
    assert is_projector("mmproj-F16.gguf") and is_projector("gemma-3-4b-it-mmproj.gguf")
    assert is_projector("MMPROJ-model-f16.GGUF")
    assert not is_projector("gemma-3-4b-it-Q4_K_M.gguf") and not is_projector("mmproj.txt")


def test_by_name_with_or_without_the_quantization_tag() -> None:
    models = ["gemma-3-4b-it-Q4_K_M", "gemma-3-4b-it-Q8_0", "llama-3.2-1b"]
    chosen, stray = match(models, [Path("mmproj-gemma-3-4b-it-f16.gguf")])
    assert names(chosen) == ["mmproj-gemma-3-4b-it-f16.gguf"] * 2 + [None]
    assert stray == []
    chosen, _ = match(["alpha", "beta"], [Path("beta-mmproj-f16.gguf"),
                                          Path("mmproj-alpha.gguf")])
    assert names(chosen) == ["mmproj-alpha.gguf", "beta-mmproj-f16.gguf"]


def test_a_longer_name_wins() -> None:
    # mmproj-gemma-3-4b-it-...: gemma-3-4b-it's, though it starts with gemma-3-4b too
    chosen, _ = match(["gemma-3-4b", "gemma-3-4b-it"],
                      [Path("mmproj-gemma-3-4b-it-vision-f16.gguf")])
    assert names(chosen) == [None, "mmproj-gemma-3-4b-it-vision-f16.gguf"]
    # a projector's own precision tag does not tie it to one quantization of its model
    chosen, _ = match(["x-Q4_K_M", "x-Q8_0", "xy-Q8_0"], [Path("mmproj-x-Q8_0.gguf")])
    assert names(chosen) == ["mmproj-x-Q8_0.gguf"] * 2 + [None]


def test_a_stray_projector_goes_to_no_model() -> None:
    chosen, stray = match(["alpha", "beta"], [Path("mmproj-F16.gguf")])
    assert chosen == [None, None] and names(stray) == ["mmproj-F16.gguf"]
    chosen, stray = match(["alpha", "beta"], [Path("mmproj-gamma-f16.gguf")])
    assert chosen == [None, None] and len(stray) == 1


def test_one_model_in_its_folder_takes_the_projector() -> None:
    chosen, stray = match(["gemma-3-4b-it-Q8_0"], [Path("mmproj-F16.gguf")])
    assert names(chosen) == ["mmproj-F16.gguf"] and stray == []
    # several: the first by name, the others named in the log
    chosen, stray = match(["solo"], [Path("mmproj-F32.gguf"), Path("mmproj-BF16.gguf")])
    assert names(chosen) == ["mmproj-BF16.gguf"] and names(stray) == ["mmproj-F32.gguf"]
    # a repository's quantizations of one model share its projector
    chosen, _ = match(["x-Q4_K_M", "x-Q8_0"], [Path("mmproj-model-f16.gguf")], one_model=True)
    assert names(chosen) == ["mmproj-model-f16.gguf"] * 2


def test_models_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lib = tmp_path / "models"
    tiny_gguf(lib / "alpha.gguf")
    tiny_gguf(lib / "beta.gguf")
    tiny_gguf(lib / "gamma-Q4_K_M.gguf")
    tiny_gguf(lib / "mmproj-F16.gguf")  # stray: two models here and it names none
    tiny_gguf(lib / "mmproj-gamma-f16.gguf")
    tiny_gguf(lib / "beta-mmproj.gguf")
    tiny_gguf(lib / "gemma" / "gemma-3-4b-it-Q8_0.gguf")  # llama-server's router layout
    tiny_gguf(lib / "gemma" / "mmproj-F16.gguf")
    tiny_gguf(lib / "big" / "big-00001-of-00002.gguf", extra={"split.no": 0, "split.count": 2})
    tiny_gguf(lib / "big" / "big-00002-of-00002.gguf", extra={"split.no": 1, "split.count": 2})
    tiny_gguf(lib / "big" / "mmproj-big-f16.gguf")
    tiny_gguf(lib / "loose" / "mmproj-alone.gguf")  # a folder without a model
    with caplog.at_level(logging.WARNING, logger="lmserve.models"):
        found = by_name(scan_dir(str(lib)))
    assert set(found) == {"alpha", "beta", "gamma-q4_k_m", "gemma-3-4b-it-q8_0", "big"}
    assert found["alpha"].mmproj is None
    assert found["beta"].mmproj == str(lib / "beta-mmproj.gguf")
    assert found["gamma-q4_k_m"].mmproj == str(lib / "mmproj-gamma-f16.gguf")
    assert found["gemma-3-4b-it-q8_0"].mmproj == str(lib / "gemma" / "mmproj-F16.gguf")
    assert found["big"].mmproj == str(lib / "big" / "mmproj-big-f16.gguf")
    # only lmserve's warnings: the gguf writer logs each file it writes when another test has
    # turned its INFO lines on
    warned = "\n".join(r.getMessage() for r in caplog.records
                       if r.name.startswith("lmserve.models") and r.levelno >= logging.WARNING)
    assert f"{lib / 'mmproj-F16.gguf'} is attached to no model" in warned
    assert f"{lib / 'loose' / 'mmproj-alone.gguf'} is attached to no model" in warned
    assert "mmproj-gamma-f16" not in warned


def test_a_model_given_by_its_path(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    a = tiny_gguf(shared / "a.gguf")
    tiny_gguf(shared / "b.gguf")
    tiny_gguf(shared / "mmproj-test.gguf")
    assert projector_for(str(a)) is None  # beside two models, named after neither
    tiny_gguf(shared / "mmproj-b-f16.gguf")
    assert projector_for(str(shared / "b.gguf")) == str(shared / "mmproj-b-f16.gguf")
    solo = tiny_gguf(tmp_path / "solo" / "model-Q4_0.gguf")
    tiny_gguf(tmp_path / "solo" / "mmproj-F16.gguf")
    assert projector_for(str(solo)) == str(tmp_path / "solo" / "mmproj-F16.gguf")
    assert projector_for(str(tmp_path / "nowhere" / "x.gguf")) is None


def test_hf_repository_files_share_its_projector(tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "src.gguf")
    hub = tmp_path / "hub"
    first = make_hf_cache(hub, source, repo="ggml-org/vis-GGUF", filename="vis-Q4_K_M.gguf")
    snapshot = first.parent
    for name in ("vis-Q8_0.gguf", "mmproj-model-f16.gguf"):
        os.symlink(os.readlink(first), snapshot / name)
    make_hf_cache(hub, source, repo="owner/text-GGUF", filename="text-Q4_K_M.gguf")
    found = by_name(scan_hf_cache(hub))
    assert set(found) == {"ggml-org/vis-GGUF:vis-Q4_K_M", "ggml-org/vis-GGUF:vis-Q8_0",
                          "owner/text-GGUF:text-Q4_K_M"}
    projector = str(snapshot / "mmproj-model-f16.gguf")
    assert found["ggml-org/vis-GGUF:vis-Q4_K_M"].mmproj == projector
    assert found["ggml-org/vis-GGUF:vis-Q8_0"].mmproj == projector
    assert found["owner/text-GGUF:text-Q4_K_M"].mmproj is None


def test_ollama_projector_layer(tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "src.gguf")
    projector = tiny_gguf(tmp_path / "proj.gguf", arch="clip")
    store = tmp_path / "ollama"
    make_ollama_store(store, source, model="vis", tag="latest", projector=projector)
    make_ollama_store(store, source, model="text", tag="latest")
    found = by_name(scan_ollama(store))
    vis = found["vis:latest"].mmproj
    assert vis is not None and Path(vis).read_bytes() == projector.read_bytes()
    assert Path(vis).parent == store / "blobs"
    assert found["text:latest"].mmproj is None
