"""The library's settings as `lmserve serve` takes them: config file keys, LMSERVE_*
variables and flags, per-model sections (and the example file), refused by name at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve import config


@pytest.mark.parametrize(("key", "value"), [
    ("max_loaded", 0), ("discover", "hf,docker"), ("memory_budget", "lots"),
    ("keep_alive", "5x"), ("load_timeout", "0"), ("max_loaded", True)])
def test_bad_library_settings_are_refused_by_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        config.build({key: value})


def test_config_file_library_keys(tmp_path: Path) -> None:
    path = tmp_path / "lmserve.toml"
    path.write_text('[server]\nmodels_dir = ["/srv/models"]\ndiscover = ["hf"]\n'
                    'max_loaded = 2\nkeep_alive = "10m"\n')
    cfg = config.build(config.load_file(str(path)))
    assert cfg.library.models_dirs == ("/srv/models",) and cfg.library.discover == ("hf",)
    assert cfg.library.max_loaded == 2 and cfg.library.keep_alive == 600.0
    env = config.from_env({"LMSERVE_MODELS_DIR": "/x", "LMSERVE_KEEP_ALIVE": "-1"})
    assert config.build(env).library.keep_alive == -1.0


# -- per-model sections ------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "models.toml"


def test_the_example_library_config_loads() -> None:
    from lmserve.models.library import LibrarySettings
    from lmserve.models.managed import ManagedModel
    from lmserve.models.registry import ModelRegistry
    from lmserve.models.resolve import resolve
    from lmserve.models.setup import StartModel, fill

    cfg = config.build(config.load_file(str(EXAMPLE)))
    assert cfg.library == LibrarySettings(max_loaded=2, memory_budget=cfg.library.memory_budget,
                                          keep_alive=300.0, load_timeout=600.0)
    (section, settings), = cfg.model_sections
    assert (section.name, section.aliases, section.keep_alive, section.at_start) == \
        ("assistant", ("smol", "default"), -1.0, True)
    assert dict(section.params) == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 256}
    assert (settings.n_ctx, settings.parallel) == (2048, 4)
    assert cfg.engine.n_ctx is None and cfg.engine.parallel == 8  # the server's stay
    registry = ModelRegistry()
    fill(registry, [StartModel(section.name, resolve(section.reference).path, settings,
                               section.aliases, section.keep_alive, section.at_start,
                               section.params)], cfg.library, cfg.engine)
    model = registry.get("smol")
    assert isinstance(model, ManagedModel) and model.name == "assistant"
    assert model.keep_alive_seconds() == -1.0 and model.card.defaults["temperature"] == 0.2
    assert model.card.status == "unloaded" and registry.manager.max_loaded == 2


@pytest.mark.parametrize(("table", "named"), [
    ('[models.a]\nmodel = "smollm2"\nflavour = "x"\n', "models.a: unknown key(s) flavour"),
    ('[models.a]\nmodel = "smollm2"\nctx = "big"\n', "models.a: n_ctx must be int"),
    ('[models.a]\nmodel = "smollm2"\nload = "later"\n', "models.a.load"),
    ('[models.a]\nmodel = "smollm2"\nkeep_alive = "soon"\n', "models.a.keep_alive"),
    ('[models.a]\nmodel = "smollm2"\nparams = {hotness = 1}\n', "models.a.params.hotness"),
    ('[models.a]\nctx = 512\n', "models.a: needs path"),
])
def test_bad_model_sections_are_refused_naming_the_key(tmp_path: Path, table: str,
                                                        named: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(table)
    with pytest.raises(ValueError) as err:
        config.build(config.load_file(str(path)))
    assert named in str(err.value)


def test_serve_refuses_bad_library_settings_at_start(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    from lmserve import cli

    assert cli.main(["serve", "--max-loaded", "0"]) == 2
    assert "max_loaded" in capsys.readouterr().err
    assert cli.main(["serve", "--models-dir", str(tmp_path / "none")]) == 2
    assert "--models-dir" in capsys.readouterr().err
