"""--vram-budget beside --memory-budget: each model's estimate splits into RAM and VRAM by its
placement (engine.hardware's offload rule, as /v1/plan counts it), and each budget limits its
own part. Fake models (tests.unit.models.test_load_manager's) with fake header estimates and
placements, and fake GPUs."""

from __future__ import annotations

import pytest

from lmserve import config
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.engine.hardware import Device, Offload
from lmserve.models import library, managed
from lmserve.models.gguf_header import GGUFHeader
from lmserve.models.library import LibraryEntry, MemoryEstimate, library_settings
from lmserve.models.managed import LoadManager, ManagedModel
from lmserve.service import EngineSettings
from tests.unit.models.test_load_manager import fake, run, use

# weights 100 over 3 blocks + the output layer (25 a layer), KV 20, compute 10: 130 in all
ESTIMATE = MemoryEstimate(weights=100, kv=20, compute=10, n_layer=3)
ALL = Offload(4, 3, "all on the GPU")  # VRAM 120 (weights and KV), RAM 10
HALF = Offload(2, 3, "2 of 4 layers")  # VRAM 50 + 20, RAM 60
CPU = Offload(0, 3, "CPU only")  # RAM 130


def placed(manager: LoadManager, name: str, offload: Offload,
           estimate: MemoryEstimate = ESTIMATE) -> ManagedModel:
    """A fake model whose header estimate and would-be placement are given."""
    model = fake(manager, name)
    model._estimated = lambda: (estimate, offload)  # type: ignore[method-assign]
    return model


def test_the_estimate_splits_by_placement() -> None:
    manager = LoadManager()
    assert placed(manager, "a", ALL).estimate() == library.MemoryNeed(ram=10, vram=120)
    assert placed(manager, "b", HALF).estimate() == library.MemoryNeed(ram=60, vram=70)
    assert placed(manager, "c", CPU).estimate() == library.MemoryNeed(ram=130, vram=0)
    no_kv = Offload(4, 3, "all, --no-kv-offload", kv_on_gpu=False)
    assert placed(manager, "d", no_kv).estimate() == library.MemoryNeed(ram=30, vram=100)
    assert placed(manager, "e", HALF).estimate().total == ESTIMATE.total == 130


def test_vram_budget_evicts_the_least_recently_used_while_ram_has_room() -> None:
    async def scenario() -> None:
        manager = LoadManager(memory_budget=1000, vram_budget=250, keep_alive=-1)
        a, b, c = (placed(manager, n, ALL) for n in "abc")
        await use(a)
        await use(b)
        await use(a)  # b is now the least recently used
        assert a.loaded and b.loaded  # 240 of 250 VRAM, 20 of 1000 RAM
        await use(c)  # 360 > 250 VRAM: b goes, though RAM has room
        assert (a.loaded, b.loaded, c.loaded) == (True, False, True)
        cpu = placed(manager, "cpu", CPU)
        await use(cpu)  # no VRAM: nothing else goes
        assert a.loaded and c.loaded and cpu.loaded
    run(scenario)


def test_a_model_whose_vram_part_exceeds_the_vram_budget_is_refused() -> None:
    async def scenario() -> None:
        manager = LoadManager(memory_budget=1000, vram_budget=100, keep_alive=-1)
        small = placed(manager, "small", HALF)  # 70 VRAM
        await use(small)
        big = placed(manager, "big", ALL)  # 120 VRAM
        with pytest.raises(LmserveError) as err:
            await use(big)
        assert err.value.kind is ErrorKind.UNAVAILABLE and err.value.code == "model_too_large"
        assert err.value.param == "model" and "--vram-budget" in err.value.message
        assert "'big'" in err.value.message and "GPU memory" in err.value.message
        assert small.loaded and not big.loaded  # nothing was evicted for it
    run(scenario)


def test_the_ram_budget_no_longer_counts_offloaded_layers() -> None:
    async def scenario() -> None:
        manager = LoadManager(memory_budget=100, keep_alive=-1)
        models = [placed(manager, n, ALL) for n in "abcd"]  # 10 RAM each
        for m in models:
            await use(m)
        assert all(m.loaded for m in models)  # 520 in all, 40 of it in RAM
        cpu = placed(manager, "cpu", CPU)  # 130 RAM alone: over the RAM budget
        with pytest.raises(LmserveError) as err:
            await use(cpu)
        assert err.value.code == "model_too_large" and "--memory-budget" in err.value.message
        half = placed(manager, "half", HALF)  # 60 RAM: 40 + 60 fits
        await use(half)
        assert all(m.loaded for m in models) and half.loaded
        other = placed(manager, "other", HALF)  # 100 + 60 > 100: the LRU (a) goes
        await use(other)
        assert not models[0].loaded and other.loaded
    run(scenario)


def test_a_loaded_model_counts_the_layers_it_did_offload() -> None:
    manager = LoadManager()
    model = placed(manager, "a", ALL)
    assert model.estimate().vram == 120
    model.service.model = object()  # type: ignore[assignment]  # loaded ...
    model.service.offload = CPU  # ... and auto found no room on the GPU
    assert model.estimate() == library.MemoryNeed(ram=130, vram=0)


def _header(n_layer: int = 3) -> GGUFHeader:
    return GGUFHeader("/m/a.gguf", 3, 10, 100 << 20, {
        "general.architecture": "llama", "llama.block_count": n_layer,
        "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.context_length": 256, "tokenizer.ggml.tokens": 1000})


def test_the_placement_comes_from_gpu_layers_and_the_gpus(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    gpu = Device("CUDA0", "a fake GPU", free=8 << 30, total=8 << 30)
    monkeypatch.setattr(managed, "gpu_facts", lambda: (True, [gpu]))
    entry = LibraryEntry("a", "/m/a.gguf", "dir", size_bytes=100 << 20, header=_header())
    manager = LoadManager()

    def need(**settings: object) -> library.MemoryNeed:
        model = ManagedModel(entry, EngineSettings(kv_layout="shared", **settings),  # type: ignore[arg-type]
                             manager)
        return model.estimate()

    everything = need(gpu_layers="all")
    kv = 256 * 3 * 2 * 64 * 2  # cells x layers x (K + V) x width x f16
    assert everything.vram == (100 << 20) + kv  # the weights and the KV cache
    assert need(gpu_layers="0", prefill_lane=0) == library.MemoryNeed(ram=everything.total,
                                                                      vram=0)
    # on the CPU alone the prefill lane's side context holds one more sequence's KV
    assert need(gpu_layers="0", threads=2) == library.MemoryNeed(ram=everything.total + kv,
                                                                 vram=0)
    assert need(gpu_layers="2").vram == (100 << 20) * 2 // 4 + kv
    assert need(gpu_layers="all", kv_offload=False).vram == 100 << 20
    assert need(gpu_layers="auto").vram == everything.vram  # 8 GiB free: all of it fits
    assert need(gpu_layers="all", cache_type_k="q8_0", cache_type_v="q8_0").vram < \
        everything.vram  # the KV in its configured types


# -- the flags --------------------------------------------------------------------------------

def test_vram_budget_takes_bytes_and_fractions_of_the_gpus(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    assert library_settings({"vram_budget": "8G"}).vram_budget == 8 << 30
    assert library_settings({"vram_budget": 1 << 30}).vram_budget == 1 << 30
    gpus = [Device("CUDA0", "", free=1 << 30, total=16 << 30),
            Device("CUDA1", "", free=1 << 30, total=8 << 30)]
    monkeypatch.setattr("lmserve.service.gpu_facts", lambda: (True, gpus))
    assert library_settings({"vram_budget": "0.5"}).vram_budget == 12 << 30  # of the total
    for bad in ("lots", "0", "-1G"):
        with pytest.raises(ValueError, match="^vram_budget: "):
            config.build({"vram_budget": bad})


def test_a_vram_fraction_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmserve.service.gpu_facts", lambda: (False, []))
    with pytest.raises(ValueError, match="^vram_budget: no GPU found"):
        config.build({"vram_budget": "0.9"})
    assert config.build({"vram_budget": "8G"}).library.vram_budget == 8 << 30


def test_the_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lmserve import cli

    env = config.from_env({"LMSERVE_VRAM_BUDGET": "4G", "LMSERVE_MEMORY_BUDGET": "16G"})
    built = config.build(env).library
    assert (built.vram_budget, built.memory_budget) == (4 << 30, 16 << 30)
    args = cli.build_parser().parse_args(["serve", "--vram-budget", "6G", "--memory-budget",
                                          "2G"])
    parsed = cli.serve_config(args).library
    assert (parsed.vram_budget, parsed.memory_budget) == (6 << 30, 2 << 30)
    monkeypatch.setattr("lmserve.service.gpu_facts", lambda: (False, []))
    assert cli.main(["serve", "--vram-budget", "0.9"]) == 2
    assert "no GPU found" in capsys.readouterr().err
