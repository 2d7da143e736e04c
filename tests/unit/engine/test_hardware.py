"""The offload and KV-type rules (lmserve.engine.hardware): pure arithmetic over a model's shape
and the devices' free memory, shared by the engine's load and /v1/plan."""

from __future__ import annotations

import pytest

from lmserve.engine import hardware, kv_layout
from lmserve.engine.hardware import Device, Offload

GIB = 1 << 30


def test_settings_parse_and_refuse_with_the_reason():
    assert hardware.kv_type("Q8_0") == "q8_0"
    with pytest.raises(ValueError, match="not a KV cache type; choose one of f32, f16"):
        hardware.kv_type("q3_k")
    assert [hardware.flash_attn(v) for v in (True, False, "ON", "auto", "disabled")] == \
        ["on", "off", "on", "auto", "off"]
    with pytest.raises(ValueError, match="on, off or auto"):
        hardware.flash_attn("sometimes")
    assert [hardware.gpu_layers(v) for v in ("auto", "ALL", "0", 12, -1)] == \
        ["auto", "all", "0", "12", "all"]
    for bad in ("many", True, "1.5"):
        with pytest.raises(ValueError, match="auto, all or a number"):
            hardware.gpu_layers(bad)
    assert hardware.tensor_split("3,1") == (3.0, 1.0) == hardware.tensor_split([3, 1])
    for bad in ("a,b", "0,0", "-1,2", ""):
        with pytest.raises(ValueError, match="tensor split"):
            hardware.tensor_split(bad)
    assert hardware.split_mode("ROW") == "row"
    with pytest.raises(ValueError, match="none, layer, row"):
        hardware.split_mode("column")


def test_kv_types_llama_cpp_cannot_run_are_refused():
    hardware.check_kv_types("q8_0", "q8_0", "auto", key_width=64, value_width=64)
    hardware.check_kv_types("q8_0", "f16", "off")  # a quantized K works without flash attn
    with pytest.raises(ValueError, match="cache_type_v q4_0 needs flash attention"):
        hardware.check_kv_types("f16", "q4_0", "off")
    with pytest.raises(ValueError, match="cache_type_k q8_0: this model's attention heads are "
                                         "80 wide, not a multiple of the 32-element blocks"):
        hardware.check_kv_types("q8_0", "f16", "on", key_width=80, value_width=80)


def test_kv_bytes_follow_the_element_types():
    smollm2 = (30, 3, 64, 64)  # layers, KV heads, key and value widths
    assert kv_layout.kv_bytes_per_token(*smollm2) == 23040  # f16: 2 bytes an element
    assert kv_layout.kv_bytes_per_token(*smollm2, "q8_0", "q8_0") == 23040 * 34 // 64
    assert kv_layout.kv_bytes_per_token(*smollm2, "q8_0", "q4_0") == \
        30 * 3 * (64 * 34 // 32 + 64 * 18 // 32)
    header = {"general.architecture": "llama", "llama.block_count": 30,
              "llama.embedding_length": 576, "llama.attention.head_count": 9,
              "llama.attention.head_count_kv": 3}
    assert kv_layout.bytes_per_token_from_metadata(header, "q8_0", "q8_0") == 12240


def test_offload_without_a_gpu_keeps_everything_on_the_cpu_and_says_why():
    cpu = hardware.offload("all", n_layer=30, size_bytes=GIB, kv_bytes=GIB, kv_offload=True,
                           devices=[], gpu_build=False)
    assert (cpu.layers, cpu.where) == (0, "cpu")
    assert cpu.reason == "CPU only: this llama.cpp build has no GPU backend " \
                         "(--gpu-layers all asked for offload)"
    unseen = hardware.offload("auto", n_layer=30, size_bytes=GIB, kv_bytes=0, kv_offload=True,
                              devices=[], gpu_build=True)
    assert unseen.layers == 0 and unseen.reason == "CPU only: llama.cpp sees no GPU"


def test_offload_counts_layers_against_the_free_vram():
    gpu = [Device("CUDA0", "H100", free=10 * GIB, total=80 * GIB)]

    def plan(setting: str, size: int, kv: int, kv_offload: bool = True) -> Offload:
        return hardware.offload(setting, n_layer=31, size_bytes=size, kv_bytes=kv,
                                kv_offload=kv_offload, devices=gpu, gpu_build=True)

    small = plan("auto", size=GIB, kv=GIB)
    assert (small.layers, small.where) == (32, "gpu") and small.weights_on_gpu(GIB) == GIB
    # 20 GiB of weights (0.625 GiB a layer) + 4 GiB of KV (0.129 GiB a layer) in
    # 0.9 x 10 GiB - 0.5 GiB = 8.5 GiB: 11 layers.
    big = plan("auto", size=20 * GIB, kv=4 * GIB)
    assert (big.layers, big.where) == (11, "split")
    assert big.reason.startswith("auto: 11 of 32 layers fit 90% of 10240 MiB free on CUDA0")
    assert big.weights_on_gpu(20 * GIB) == 20 * GIB * 11 // 32
    # The KV kept in RAM (--no-kv-offload) leaves room for more weights.
    assert plan("auto", size=20 * GIB, kv=4 * GIB, kv_offload=False).layers == 13
    assert plan("all", size=20 * GIB, kv=0).layers == 32  # as asked, whether or not it fits
    assert plan("40", size=GIB, kv=0).layers == 32 and plan("7", size=GIB, kv=0).layers == 7
    assert plan("auto", size=200 * GIB, kv=0).layers == 1  # 6.25 GiB a layer
    assert plan("auto", size=400 * GIB, kv=0).layers == 0


def test_rpc_servers_parse_as_ggml_reads_them_and_refuse_with_the_reason():
    assert hardware.rpc_servers("10.0.0.2:50052, gpu-box:050053") == \
        ("10.0.0.2:50052", "gpu-box:50053") == \
        hardware.rpc_servers(["10.0.0.2:50052", "gpu-box:50053"])  # a config file's list
    assert hardware.rpc_servers("") == () == hardware.rpc_servers([])
    for bad, why in (("10.0.0.2", "is not HOST:PORT"), (":50052", "is not HOST:PORT"),
                     ("h:port", "is not HOST:PORT"), ("h:0", "the port must be 1-65535"),
                     ("h:70000", "the port must be 1-65535"),
                     ("[::1]:50052", "takes no IPv6 addresses"),
                     ("fe80::1:50052", "takes no IPv6 addresses"),
                     ("h:1,h:01", "h:1 is named twice"),
                     (",".join(f"h:{p}" for p in range(1, 18)), "at most 16")):
        with pytest.raises(ValueError, match=why):
            hardware.rpc_servers(bad)


def test_offload_names_the_devices_the_layers_go_to():
    devices = [Device("RPC0", "10.0.0.2:50052", free=20 * GIB, total=32 * GIB),
               Device("CUDA0", "H100", free=10 * GIB, total=80 * GIB)]

    def plan(setting: str) -> Offload:
        return hardware.offload(setting, n_layer=31, size_bytes=20 * GIB, kv_bytes=0,
                                kv_offload=True, devices=devices, gpu_build=True)

    names = ("RPC0 (10.0.0.2:50052)", "CUDA0 (H100)")
    assert plan("all").devices == names == plan("5").devices
    auto = plan("auto")  # the free memory of both, RPC server and GPU, counts
    assert auto.layers == 32 and auto.devices == names and "on RPC0, CUDA0" in auto.reason
    assert plan("0").devices == ()  # nothing offloaded, nowhere named
