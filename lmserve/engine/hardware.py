"""Where a model runs: how many layers go to the GPU, how the KV cache is stored, and whether
llama.cpp can run that combination. Pure rules over numbers (the GGUF header's shape, the free
memory of the devices llama.cpp reports); engine.runner asks llama.cpp for the devices, and
service.py and /v1/plan both size a model with these rules, so a plan matches the load.

llama.cpp counts n_layer repeating blocks plus the output layer as offloadable, so "all" is
n_layer + 1 layers, and each layer's share of the weights is size / (n_layer + 1)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20

# KV cache element types llama.cpp's CPU and GPU backends run: name -> (ggml type id, bytes
# per element). Quantized types store blocks of 32 elements (q8_0: 32 int8 + one f16 scale).
KV_TYPES: dict[str, tuple[int, float]] = {
    "f32": (0, 4.0), "f16": (1, 2.0), "bf16": (30, 2.0),
    "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32), "q4_1": (3, 20 / 32),
    "q5_0": (6, 22 / 32), "q5_1": (7, 24 / 32), "iq4_nl": (20, 18 / 32),
}
QUANT_BLOCK = 32
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}  # llama_split_mode
GPU_HEADROOM = 512 * MIB  # kept free on the GPU for compute buffers and the driver
GPU_SHARE = 0.9  # of the free VRAM that auto offload may fill


def kv_type(value: object) -> str:
    """A KV cache type name (f16, q8_0, ...), case-insensitive."""
    name = str(value).strip().lower()
    if name not in KV_TYPES:
        raise ValueError(f"{value!r} is not a KV cache type; choose one of "
                         f"{', '.join(KV_TYPES)}")
    return name


def flash_attn(value: object) -> str:
    """on | off | auto; a config file's true/false (seed 003's flash_attn) means on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    name = str(value).strip().lower()
    name = {"true": "on", "1": "on", "enabled": "on", "false": "off", "0": "off",
            "disabled": "off"}.get(name, name)
    if name not in FLASH_ATTN:
        raise ValueError(f"{value!r}: flash attention is on, off or auto")
    return name


def split_mode(value: object) -> str:
    name = str(value).strip().lower()
    if name not in SPLIT_MODES:
        raise ValueError(f"{value!r}: the split mode is one of {', '.join(SPLIT_MODES)}")
    return name


def gpu_layers(value: object) -> str:
    """auto | all | a count of layers (0: everything on the CPU), kept as text."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r}: GPU layers are auto, all or a number")
    name = str(value).strip().lower()
    if name in ("auto", "all"):
        return name
    try:
        count = int(name)
    except ValueError:
        raise ValueError(f"{value!r}: GPU layers are auto, all or a number") from None
    if count < 0:
        return "all"  # llama.cpp's own -1: every layer
    return str(count)


def tensor_split(value: object) -> tuple[float, ...]:
    """Proportions per GPU: "3,1" or a list of numbers (a config file)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).replace("/", ",").split(",")
    try:
        shares = tuple(float(p) for p in parts if str(p).strip())
    except ValueError:
        raise ValueError(f"{value!r}: the tensor split is numbers, e.g. 3,1") from None
    if not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"{value!r}: the tensor split needs non-negative shares, not all 0")
    return shares


RPC_MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS


def rpc_servers(value: object) -> tuple[str, ...]:
    """llama.cpp RPC servers, "host:port,host:port" or a list (a config file), as HOST:PORT
    texts in the given order; empty: none. ggml splits an endpoint at its first colon, so a
    host is a name or an IPv4 address, never a bracketed IPv6 one."""
    if isinstance(value, (list, tuple)):
        parts = [str(p).strip() for p in value]
    else:
        parts = [p.strip() for p in str(value).split(",")]
    parts = [p for p in parts if p]
    servers: list[str] = []
    for part in parts:
        host, sep, port_text = part.partition(":")
        bad = f"{part!r} is not HOST:PORT (an RPC server, e.g. 192.168.1.10:50052)"
        if not sep or not host or any(c.isspace() or c in "[]/" for c in host) or \
                not port_text.isdigit():
            raise ValueError(bad + (": ggml's RPC client takes no IPv6 addresses" if
                                    part.startswith("[") or part.count(":") > 1 else ""))
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"{part!r}: the port must be 1-65535")
        endpoint = f"{host}:{port}"
        if endpoint in servers:
            raise ValueError(f"{endpoint} is named twice")
        servers.append(endpoint)
    if len(servers) > RPC_MAX_SERVERS:
        raise ValueError(f"{len(servers)} RPC servers: llama.cpp takes at most "
                         f"{RPC_MAX_SERVERS}")
    return tuple(servers)


def check_kv_types(type_k: str, type_v: str, flash: str, *, key_width: int | None = None,
                   value_width: int | None = None) -> None:
    """Refuse what llama.cpp cannot run, before it is asked: a quantized V cache only works
    inside flash attention, and a quantized row must be whole blocks of 32."""
    if type_v not in ("f32", "f16", "bf16") and flash == "off":
        raise ValueError(f"cache_type_v {type_v} needs flash attention (llama.cpp quantizes "
                         "the V cache only inside it): use flash_attn on or auto, or "
                         "cache_type_v f16")
    for key, name, width in (("cache_type_k", type_k, key_width),
                             ("cache_type_v", type_v, value_width)):
        if name not in ("f32", "f16", "bf16") and width and width % QUANT_BLOCK:
            raise ValueError(f"{key} {name}: this model's attention heads are {width} wide, "
                             f"not a multiple of the {QUANT_BLOCK}-element blocks {name} "
                             "stores")


def kv_bytes_per_token(n_layer: int, n_head_kv: int, key_length: int, value_length: int,
                       type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V rows of one cell on every layer, in the given element types."""
    k = n_head_kv * key_length * KV_TYPES[type_k][1]
    v = n_head_kv * value_length * KV_TYPES[type_v][1]
    return int(n_layer * (k + v))


@dataclass(frozen=True)
class Device:
    """A GPU (or integrated GPU, or accelerator) llama.cpp can offload to."""

    name: str
    description: str
    free: int
    total: int


@dataclass(frozen=True)
class Offload:
    """How many layers go to the GPU, and why."""

    layers: int  # offloaded layers, output layer included (n_layer + 1: all)
    n_layer: int
    reason: str

    @property
    def where(self) -> str:
        """cpu | gpu | split: where the weights live."""
        if self.layers <= 0:
            return "cpu"
        return "gpu" if self.layers >= self.n_layer + 1 else "split"

    kv_on_gpu: bool = True  # the KV cache of the offloaded layers too (not --no-kv-offload)
    devices: tuple[str, ...] = ()  # where offloaded layers go: "NAME (DESCRIPTION)", in order

    def weights_on_gpu(self, size_bytes: int) -> int:
        return size_bytes * min(self.layers, self.n_layer + 1) // (self.n_layer + 1)

    def kv_on_gpu_bytes(self, kv_bytes: int) -> int:
        """The KV cache on the GPU: all of it when layers are offloaded and the KV with them
        (not --no-kv-offload), as /v1/plan and /api/ps count it."""
        return kv_bytes if self.layers > 0 and self.kv_on_gpu else 0

    def vram_bytes(self, size_bytes: int, kv_bytes: int) -> int:
        """What a model of these weights and KV cache takes on the GPU (/v1/plan's
        weights_gpu_bytes + kv_cache_gpu_bytes; the --vram-budget estimate)."""
        weights = self.weights_on_gpu(size_bytes) if self.n_layer else 0
        return weights + self.kv_on_gpu_bytes(kv_bytes)


def offload(setting: str, *, n_layer: int, size_bytes: int, kv_bytes: int, kv_offload: bool,
            devices: list[Device], gpu_build: bool) -> Offload:
    """The layers to offload for --gpu-layers `setting` (auto | all | N). auto: as many as fit
    GPU_SHARE of the devices' free memory less GPU_HEADROOM, each layer taking its share of
    the weights and, when the KV is offloaded too, of the KV cache."""
    everything = n_layer + 1
    if not gpu_build or not devices:
        why = "this llama.cpp build has no GPU backend" if not gpu_build else \
            "llama.cpp sees no GPU"
        if setting not in ("auto", "0"):
            why += f" (--gpu-layers {setting} asked for offload)"
        return Offload(0, n_layer, f"CPU only: {why}", kv_offload)
    names = tuple(f"{d.name} ({d.description})" for d in devices)
    if setting == "all":
        return Offload(everything, n_layer, f"all {everything} layers on the GPU, as configured",
                       kv_offload, names)
    if setting != "auto":
        count = min(int(setting), everything)
        return Offload(count, n_layer, f"{count} of {everything} layers on the GPU, as "
                                       "configured", kv_offload, names if count else ())
    free = sum(d.free for d in devices)
    budget = int(free * GPU_SHARE) - GPU_HEADROOM
    per_layer = size_bytes / everything + (kv_bytes / n_layer if kv_offload and n_layer else 0)
    count = max(0, min(everything, int(budget // per_layer) if per_layer > 0 else everything))
    return Offload(count, n_layer, f"auto: {count} of {everything} layers fit "
                                   f"{GPU_SHARE:.0%} of {free // MIB} MiB free on "
                                   f"{', '.join(d.name for d in devices)} "
                                   f"(less {GPU_HEADROOM // MIB} MiB headroom)", kv_offload,
                   names if count else ())
