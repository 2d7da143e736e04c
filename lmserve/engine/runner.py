"""The llama.cpp boundary: model, context, batch, KV memory ops and sampler chains.

This is the only module that imports llama_cpp. Everything here runs on the engine
thread that owns the context (or at load time); ctypes releases the GIL inside each call,
so llama_decode does not block the HTTP side.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp as ll
import numpy as np
from llama_cpp import mtmd_cpp as mtmd

from lmserve.core.errors import invalid
from lmserve.core.images import MEDIA_MARKER, MediaSpan
from lmserve.core.request import SamplingParams
from lmserve.engine import hardware, kv_state, rpc
from lmserve.engine.media_cache import EmbeddingDisk, projector_namespace

log = logging.getLogger("lmserve.runner")

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            ll.llama_backend_init()
            _silence_llama_logs()
            _backend_ready = True


def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load time; keep its warnings and errors, drop the rest.
    if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


# The C callback; kept at module level so it outlives every call llama.cpp makes to it.
_log_callback = ll.llama_log_callback(_log)


def _silence_llama_logs() -> None:
    if os.environ.get("LMSERVE_LLAMA_VERBOSE"):
        return
    ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def read_info(path: str) -> ModelInfo:
    """A model's facts without its weights (llama.cpp's vocab-only load), to size the load."""
    model = Model(path, header_only=True)
    try:
        info = model.info
        # A vocab-only load reads no hyperparameters: the layer count and the training
        # context come from the header's metadata, the size from the file.
        def number(key: str) -> int:
            try:
                return int(info.metadata.get(f"{info.architecture}.{key}", 0))
            except ValueError:
                return 0
        return dataclasses.replace(
            info, size_bytes=info.size_bytes or os.path.getsize(path),
            n_layer=info.n_layer or number("block_count"),
            n_ctx_train=info.n_ctx_train or number("context_length"))
    finally:
        model.close()


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp puts a model's weights and KV cache: llama_model_params and the KV and
    attention fields of llama_context_params (see engine.hardware for the rules)."""

    gpu_layers: int = 0
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    mmap: bool = True
    mlock: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    kv_offload: bool = True
    op_offload: bool = True
    rpc: tuple[str, ...] = ()  # RPC servers (HOST:PORT) whose devices take offloaded layers


def gpu_build() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan, ...).
    llama_supports_gpu_offload() also says yes for a build whose only offload backend is RPC,
    which offloads nothing until servers are named (--rpc); that alone is no GPU backend."""
    _init_backend()
    if not ll.llama_supports_gpu_offload():
        return False
    try:
        lib = _ggml()
        names = {(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)) or b"").decode()
                 for i in range(lib.ggml_backend_reg_count())}
    except (OSError, AttributeError, StopIteration):
        return True
    return bool(names - {"CPU", "RPC", "BLAS"})


_GGML_DEVICE_CPU, _GGML_DEVICE_GPU, _GGML_DEVICE_IGPU, _GGML_DEVICE_ACCEL = 0, 1, 2, 3
_ggml_lib: ctypes.CDLL | None = None


def _ggml() -> ctypes.CDLL:
    """libggml of the llama-cpp-python build, with the prototypes of ggml's device, backend
    registry and RPC API that lmserve calls (llama-cpp-python binds none of them)."""
    global _ggml_lib
    if _ggml_lib is not None:
        return _ggml_lib
    _init_backend()
    where = os.path.join(os.path.dirname(ll.__file__), "lib")
    name = next(n for n in ("libggml.so", "libggml.dylib", "ggml.dll")
                if os.path.exists(os.path.join(where, n)))
    lib = ctypes.CDLL(os.path.join(where, name))
    ptr, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for fn, restype, argtypes in (
            ("ggml_backend_dev_count", size, []), ("ggml_backend_dev_get", ptr, [size]),
            ("ggml_backend_dev_type", ctypes.c_int, [ptr]),
            ("ggml_backend_dev_name", text, [ptr]), ("ggml_backend_dev_description", text, [ptr]),
            ("ggml_backend_dev_memory", None, [ptr, ctypes.POINTER(size), ctypes.POINTER(size)]),
            ("ggml_backend_dev_backend_reg", ptr, [ptr]),
            ("ggml_backend_dev_by_name", ptr, [text]),
            ("ggml_backend_reg_count", size, []), ("ggml_backend_reg_get", ptr, [size]),
            ("ggml_backend_reg_name", text, [ptr]), ("ggml_backend_reg_by_name", ptr, [text]),
            ("ggml_backend_reg_dev_count", size, [ptr]),
            ("ggml_backend_reg_dev_get", ptr, [ptr, size]),
            ("ggml_backend_reg_get_proc_address", ptr, [ptr, text])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = restype, argtypes
    _ggml_lib = lib
    return lib


def _device(lib: ctypes.CDLL, dev: int) -> hardware.Device:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return hardware.Device((lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                           (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                           int(free.value), int(total.value))


def _local_gpus(lib: ctypes.CDLL) -> list[int]:
    """The GPUs llama.cpp offloads to when a model names no devices: the discrete GPUs, or the
    integrated ones when there are none (RPC devices, had any been registered, left out)."""
    gpus: list[int] = []
    igpus: list[int] = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in (_GGML_DEVICE_GPU, _GGML_DEVICE_IGPU) or \
                lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) == b"RPC":
            continue
        (gpus if kind == _GGML_DEVICE_GPU else igpus).append(dev)
    return gpus or igpus


def gpu_devices() -> list[hardware.Device]:
    """The GPUs llama.cpp's backends see, with their free and total memory; [] when it
    cannot tell."""
    if not gpu_build():
        return []
    try:
        lib = _ggml()
        return [_device(lib, dev) for dev in _local_gpus(lib)]
    except (OSError, AttributeError, StopIteration) as exc:
        log.warning("could not list llama.cpp's GPU devices: %s", exc)
        return []


# -- llama.cpp's RPC backend: devices of other hosts (docs/deploy.md) -----------------------

_rpc_lock = threading.Lock()
_rpc_servers: dict[str, list[int]] = {}  # endpoint -> its devices (ggml_backend_dev_t)


def rpc_supported() -> bool:
    """Whether this llama.cpp build has the RPC backend (-DGGML_RPC=ON)."""
    try:
        return bool(_ggml().ggml_backend_reg_by_name(b"RPC"))
    except (OSError, AttributeError, StopIteration):
        return False


def _rpc_proc(name: str) -> int:
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    proc = lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not proc:
        raise RuntimeError(f"this llama.cpp build has no RPC backend ({name} not found); "
                           "build llama-cpp-python with -DGGML_RPC=ON (make install does)")
    return int(proc)


def check_rpc_servers(endpoints: Sequence[str]) -> list[rpc.ServerInfo]:
    """Each server reachable and speaking this build's protocol, or rpc.RpcUnavailable (a
    ValueError) naming it; RuntimeError when the build has no RPC backend."""
    if endpoints and not rpc_supported():
        raise RuntimeError("this llama.cpp build has no RPC backend; build llama-cpp-python "
                           "with -DGGML_RPC=ON (make install does)")
    return [rpc.probe(e) for e in endpoints]


def rpc_devices(endpoints: Sequence[str]) -> list[int]:
    """The devices of these RPC servers, in order, each server added to ggml once per process
    (llama.cpp's ggml_backend_rpc_add_server, as its common --rpc does; the devices are not
    registered globally, so only models that name the server use them). A server is probed
    first: ggml aborts the process on one it cannot reach."""
    out: list[int] = []
    with _rpc_lock:
        for endpoint in endpoints:
            if endpoint not in _rpc_servers:
                check_rpc_servers([endpoint])
                add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
                    _rpc_proc("ggml_backend_rpc_add_server"))
                reg = add(endpoint.encode())
                if not reg:
                    raise RuntimeError(f"{endpoint}: llama.cpp could not add the RPC server")
                lib = _ggml()
                _rpc_servers[endpoint] = [lib.ggml_backend_reg_dev_get(reg, i)
                                          for i in range(lib.ggml_backend_reg_dev_count(reg))]
            out.extend(_rpc_servers[endpoint])
    return out


def offload_devices(endpoints: Sequence[str]) -> list[tuple[int, hardware.Device]]:
    """The devices a model with these RPC servers offloads to, in llama.cpp's default order:
    the RPC servers' devices first (fewer transfers over the network), then this host's GPUs.
    The order --tensor-split's shares follow."""
    devices = rpc_devices(endpoints)
    lib = _ggml()
    devices += _local_gpus(lib) if gpu_build() else []
    return [(dev, _device(lib, dev)) for dev in devices]


def rpc_server_devices(names: Sequence[str]) -> list[tuple[int, hardware.Device]]:
    """The devices `lmserve rpc-server` serves: these (ggml names: CPU, CUDA0, ...) or
    ValueError; without names the GPUs and other non-CPU devices, else the CPU, as llama.cpp's
    rpc-server picks."""
    lib = _ggml()
    every = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    devices: list[int] = []
    for name in names:
        dev = lib.ggml_backend_dev_by_name(name.encode())
        if not dev:
            known = ", ".join((lib.ggml_backend_dev_name(d) or b"").decode() for d in every)
            raise ValueError(f"--device {name}: no such device; this host has {known}")
        devices.append(dev)
    devices = devices or [
        d for d in every if lib.ggml_backend_dev_type(d) not in (_GGML_DEVICE_CPU,
                                                                 _GGML_DEVICE_ACCEL)
        and lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(d)) != b"RPC"] or \
        [lib.ggml_backend_dev_by_name(b"CPU")]
    return [(d, _device(lib, d)) for d in devices]


def serve_rpc(endpoint: str, devices: Sequence[int], *, cache_dir: str | None,
              threads: int) -> None:
    """Blocks in llama.cpp's RPC server (ggml_backend_rpc_start_server) for these devices (of
    rpc_server_devices); returns only when it could not start (it printed why)."""
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))(
        _rpc_proc("ggml_backend_rpc_start_server"))
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices),
          array)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    description: str
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_layer: int
    n_params: int
    size_bytes: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    metadata: dict[str, str]


class Model:
    """A loaded GGUF model (weights shared by every context made from it)."""

    def __init__(self, path: str, *, progress: Callable[[float], None] | None = None,
                 placement: Placement | None = None, header_only: bool = False,
                 load_mtp: bool = False) -> None:
        _init_backend()
        place = placement or Placement()
        params = ll.llama_model_default_params()
        params.vocab_only = header_only  # metadata and vocabulary, no weights
        params.load_mtp = load_mtp  # the MTP / NextN layers too (engine.mtp_draft)
        params.n_gpu_layers = place.gpu_layers
        params.split_mode = hardware.SPLIT_MODES[place.split_mode]
        params.main_gpu = place.main_gpu
        params.use_mmap = place.mmap
        params.use_mlock = place.mlock
        self._tensor_split = None  # kept alive while llama.cpp reads it
        if place.tensor_split:
            shares = list(place.tensor_split)[:ll.llama_max_devices()]
            shares += [0.0] * (ll.llama_max_devices() - len(shares))
            self._tensor_split = (ctypes.c_float * len(shares))(*shares)
            params.tensor_split = self._tensor_split
        self._devices = None  # the NULL-terminated device list, kept alive while loading
        if place.rpc and not header_only:  # else llama.cpp picks this host's GPUs itself
            devices = [dev for dev, _ in offload_devices(place.rpc)]
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            params.devices = ctypes.addressof(self._devices)
        self._progress_cb = None
        if progress is not None:
            def on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
                progress(fraction)
                return True
            self._progress_cb = ll.llama_progress_callback(on_progress)
            params.progress_callback = self._progress_cb
        model = ll.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model file {path!r}")
        self.ptr = model
        self.path = path
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.vocab_type = int(ll.llama_vocab_type(self.vocab))  # enum llama_vocab_type
        # MTP / NextN layers the GGUF carries (drafted with under --draft mtp: engine.mtp_draft)
        self.nextn_layers = int(ll.llama_model_n_layer_nextn(model))
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._shown: list[bytes | None] = [None] * self.n_vocab
        self._piece_buf = ctypes.create_string_buffer(256)
        self._tok_lock = threading.Lock()
        self._control_tokens: dict[frozenset[str], frozenset[int]] = {}  # control_tokens()
        self.eog_tokens = frozenset(t for t in range(self.n_vocab)
                                    if ll.llama_vocab_is_eog(self.vocab, t))
        self.info = self._read_info()
        if header_only:  # llama.cpp reads no hyperparameters then: the GGUF key says
            arch = self.info.metadata.get("general.architecture", "")
            nextn = self.info.metadata.get(f"{arch}.nextn_predict_layers", "0")
            self.nextn_layers = int(nextn) if nextn.isdigit() else 0
        # path -> adapter (a llama_adapter_lora *), freed with the model
        self.loras: dict[str, ctypes._Pointer[ctypes.c_void_p]] = {}

    # -- metadata ---------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(ll.llama_model_meta_count(self.ptr)):
            if ll.llama_model_meta_key_by_index(self.ptr, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            if ll.llama_model_meta_val_str_by_index(self.ptr, i, buf, len(buf)) < 0:
                continue
            out[key] = buf.value.decode("utf-8", "replace")
        return out

    def _read_info(self) -> ModelInfo:
        meta = self._meta()
        template = ll.llama_model_chat_template(self.ptr, None)
        desc = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self.ptr, desc, len(desc))
        bos, eos = ll.llama_vocab_bos(self.vocab), ll.llama_vocab_eos(self.vocab)
        return ModelInfo(
            path=self.path,
            architecture=meta.get("general.architecture", "unknown"),
            description=desc.value.decode("utf-8", "replace"),
            n_ctx_train=ll.llama_model_n_ctx_train(self.ptr),
            n_vocab=self.n_vocab,
            n_embd=ll.llama_model_n_embd(self.ptr),
            n_layer=ll.llama_model_n_layer(self.ptr),
            n_params=ll.llama_model_n_params(self.ptr),
            size_bytes=ll.llama_model_size(self.ptr),
            chat_template=template.decode("utf-8") if template else None,
            bos_token=self.token_text(bos) if bos >= 0 else "",
            eos_token=self.token_text(eos) if eos >= 0 else "",
            add_bos=bool(ll.llama_vocab_get_add_bos(self.vocab)),
            metadata={k: v for k, v in meta.items() if len(v) < 2048},
        )

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """Bytes a generated token contributes to the output (control tokens give b"")."""
        cached = self._pieces[token]
        if cached is None:
            cached = self._token_bytes(token, special=False)
            self._pieces[token] = cached
        return cached

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes, control tokens as their text (how logprobs show a token)."""
        return self._shown[token] or self._remember_shown(token)

    def _remember_shown(self, token: int) -> bytes:
        self._shown[token] = shown = self._token_bytes(token, special=True)
        return shown

    def token_text(self, token: int) -> str:
        return self._token_bytes(token, special=True).decode("utf-8", "replace")

    def _token_bytes(self, token: int, *, special: bool) -> bytes:
        with self._tok_lock:
            buf = self._piece_buf
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            return buf.raw[:n]

    def control_tokens(self, texts: set[str]) -> frozenset[int]:
        """Ids of the tokens whose text is one of `texts` and that piece() would leave out
        (control tokens), so a parser that reads them as markers can be shown them. Every chat
        request asks, for one of a few marker sets per model, so each set is looked up once."""
        key = frozenset(texts)
        found = self._control_tokens.get(key)
        if found is None:
            ids = [self.tokenize(text, add_special=False, parse_special=True) for text in key]
            found = frozenset(t[0] for t in ids
                              if len(t) == 1 and not self.piece(t[0]) and self.token_bytes(t[0]))
            self._control_tokens[key] = found
        return found

    def detokenize(self, tokens: Sequence[int]) -> str:
        data = b"".join(self._token_bytes(t, special=True) for t in tokens)
        return data.decode("utf-8", "replace")

    def load_lora(self, path: str) -> None:
        """Load a LoRA adapter GGUF for this model; contexts apply it with set_adapters."""
        if path not in self.loras:
            adapter = ll.llama_adapter_lora_init(self.ptr, path.encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load {path!r} as a LoRA adapter of "
                                   f"this model (its log above says why: not an adapter GGUF, "
                                   f"or made for another base model)")
            self.loras[path] = adapter

    def close(self) -> None:
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None


class _Chunks:
    """An mtmd_input_chunks list, freed when the last prompt that uses it goes."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        if self.ptr:
            mtmd.mtmd_input_chunks_free(self.ptr)
            self.ptr = 0


@dataclass(frozen=True)
class MediaChunk:
    """The engine's handle to one image (or audio window) of a prompt (MediaSpan.chunk)."""

    owner: _Chunks  # keeps the chunk list alive
    ptr: int  # the mtmd_input_chunk inside it


def chunk_key(key: str, n: int) -> str:
    """The content key of the n-th chunk of one input (an audio clip longer than the
    encoder's window, an image cut into slices): its own hash, so that the embedding cache
    and the stand-in ids tell the chunks apart; the first keeps the input's hash."""
    return key if n == 0 else hashlib.sha256(f"{key}/{n}".encode()).hexdigest()


def stand_in_ids(key: str, n: int) -> list[int]:
    """Token ids for an image's positions: negative (no vocabulary id is), and derived from
    the content hash and the position, so two prompts share a prefix over an image exactly
    when they hold the same image there."""
    seed = int(key[:16], 16)
    return [-1 - ((seed + i * 0x9E3779B97F4A7C15) & 0x3FFFFFFFFFFF) % 0x7FFFFFFE
            for i in range(n)]


class EmbeddingCache:
    """Encoded images (the projector's output embeddings) by content hash, least recently
    used first out once they pass `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: dict[str, np.ndarray] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        item = self._items.pop(key, None)
        if item is None:
            self.misses += 1
            return None
        self._items[key] = item  # most recent last
        self.hits += 1
        return item

    def put(self, key: str, embd: np.ndarray) -> None:
        if embd.nbytes > self.max_bytes:
            return
        self._items[key] = embd
        self.bytes += embd.nbytes
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self.bytes -= self._items.pop(oldest).nbytes

    def __len__(self) -> int:
        return len(self._items)


class Projector:
    """A multimodal projector (mmproj GGUF) loaded beside a model through llama.cpp's mtmd:
    it turns a prompt with media markers plus images or audio clips (mtmd decodes WAV and
    MP3) into token ids and MediaSpans (tokenize, on any thread) and, on the engine thread,
    encodes one chunk and decodes its embeddings into a sequence's KV
    (Context.decode_media). `vision` and `audio` say which inputs its encoders take."""

    def __init__(self, model: Model, path: str, *, n_threads: int, use_gpu: bool,
                 cache_bytes: int = 256 << 20, disk_dir: str | None = None,
                 disk_bytes: int = 1 << 30) -> None:
        _init_backend()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        params.media_marker = MEDIA_MARKER.encode()
        ptr = mtmd.mtmd_init_from_file(path.encode(), model.ptr, params)
        if not ptr:
            raise RuntimeError(f"llama.cpp could not load {path!r} as a multimodal projector "
                               f"for this model (not an mmproj GGUF, or made for a model of "
                               f"another embedding width; its log above says which)")
        self.ptr = ptr
        self.path = path
        self.disk: EmbeddingDisk | None = None
        self.model = model
        self.n_embd = model.info.n_embd
        self.vision = bool(mtmd.mtmd_support_vision(ptr))
        self.audio = bool(mtmd.mtmd_support_audio(ptr))
        if mtmd.mtmd_decode_use_mrope(ptr):
            self.close()
            raise RuntimeError(f"{path!r} is a projector for M-RoPE models (Qwen2-VL and "
                               f"kin), whose image positions lmserve does not place yet")
        self.cache = EmbeddingCache(cache_bytes)
        # The disk tier (--media-cache-dir): encoded images that outlive the process.
        if disk_dir:
            self.disk = EmbeddingDisk(disk_dir, projector_namespace(path, self.n_embd),
                                      disk_bytes)
        self.encoded = 0  # chunks run through the encoder (cache misses)

    def tokenize(self, text: str, images: Sequence[tuple[bytes, str]], *, add_special: bool,
                 params: Sequence[str] = (), kinds: Sequence[str] = ()
                 ) -> tuple[list[int], list[MediaSpan]]:
        """Token ids of a prompt whose text holds one MEDIA_MARKER per input ((bytes, sha256
        hex), in order: images or audio clips, `kinds` says which), with stand-in ids at each
        chunk's positions, and the chunks' spans (an audio clip is one chunk per 30-second
        window of Whisper-style encoders)."""
        bitmaps = []
        try:
            for i, (data, key) in enumerate(images):
                buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ptr, buf, len(data), False)
                if not bitmap:
                    param = params[i] if i < len(params) else "images"
                    kind = kinds[i] if i < len(kinds) else "image"
                    raise invalid(f"{param}: the {kind} could not be decoded", param=param,
                                  code=f"invalid_{kind}")
                # the input's place makes its chunks' ids unique in this prompt (_read_chunks)
                mtmd.mtmd_bitmap_set_id(bitmap, f"{key}#{i}".encode())
                bitmaps.append(bitmap)
            chunks = _Chunks(mtmd.mtmd_input_chunks_init())
            data_text = text.encode("utf-8")
            inp = mtmd.mtmd_input_text(text=data_text, text_len=len(data_text),
                                       add_special=add_special, parse_special=True)
            arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            status = mtmd.mtmd_tokenize(self.ptr, chunks.ptr, ctypes.byref(inp), arr,
                                        len(bitmaps))
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        if status == 2:  # the encoder's preprocessing refused an input (e.g. empty audio)
            raise invalid("the prompt's media could not be prepared for the projector "
                          "(an empty or unreadable image or audio clip)", param="messages",
                          code="invalid_audio" if "audio" in kinds else "invalid_image")
        if status != 0:
            raise invalid(f"the prompt's media markers and inputs do not match (mtmd status "
                          f"{status})", param="messages", code="invalid_image")
        return self._read_chunks(chunks)

    def _read_chunks(self, chunks: _Chunks) -> tuple[list[int], list[MediaSpan]]:
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        seen: dict[str, int] = {}  # chunks so far of each input (by its id "sha256#place")
        n_out = ctypes.c_size_t(0)
        for i in range(mtmd.mtmd_input_chunks_size(chunks.ptr)):
            chunk = mtmd.mtmd_input_chunks_get(chunks.ptr, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_out))
                tokens.extend(ids[:n_out.value])
                continue
            n = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            chunk_id = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
            seen[chunk_id] = seen.get(chunk_id, 0) + 1
            key = chunk_key(chunk_id.partition("#")[0], seen[chunk_id] - 1)
            spans.append(MediaSpan(len(tokens), n, key, MediaChunk(chunks, chunk)))
            tokens.extend(stand_in_ids(key, n))
        return tokens, spans

    def embeddings(self, span: MediaSpan) -> tuple[np.ndarray, bool]:
        """The chunk's encoded embeddings ([n_tokens * n_embd] float32), and whether they came
        from the cache. Engine thread only (the encoder's buffers are the context's)."""
        cached = self.cache.get(span.key)
        if cached is not None:
            return cached, True
        n_values = span.n_tokens * self.n_embd
        stored = self.disk.get(span.key, n_values) if self.disk is not None else None
        if stored is not None:
            self.cache.put(span.key, stored)
            return stored, True
        chunk = span.chunk
        assert isinstance(chunk, MediaChunk)
        status = mtmd.mtmd_encode_chunk(self.ptr, chunk.ptr)
        if status != 0:
            raise RuntimeError(f"the projector could not encode the input (status {status})")
        out = mtmd.mtmd_get_output_embd(self.ptr)
        embd = np.ctypeslib.as_array(out, shape=(n_values,)).copy()
        self.encoded += 1
        self.cache.put(span.key, embd)
        if self.disk is not None:
            self.disk.put(span.key, embd)  # written by the disk tier's own thread
        return embd, False

    def close_disk(self) -> None:
        """Finish the disk tier's queued writes (the server stops, or the model unloads)."""
        if self.disk is not None:
            self.disk.close()

    def close(self) -> None:
        self.close_disk()
        if self.ptr:
            mtmd.mtmd_free(self.ptr)
            self.ptr = None


class Sampler:
    """A per-sequence llama.cpp sampler chain; sampling runs in C over the logits row.

    A grammar is kept out of the chain and checked on the chain's choice first, as llama.cpp's
    own common sampler does: checking one token is cheap, while constraining a whole row costs
    a walk of the grammar for each of the vocabulary's tokens (49,152 for SmolLM2) at every
    step. Only a choice the grammar refuses makes the row constrained and sampled again. The
    result has the constrained distribution: a token the chain picks with probability p(t) is
    kept if valid, and the rest (the invalid mass m) resamples from p(t) / (1 - m)."""

    def __init__(self, model: Model, params: SamplingParams, *, seed: int,
                 banned: Sequence[int] = ()) -> None:
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        self.ptr = chain
        self.grammar: ll.llama_sampler_p | None = None
        self.n_vocab = model.n_vocab
        self._row: np.ndarray | None = None  # the candidates, for a grammar's resampling

        def add(smpl: ll.llama_sampler_p) -> None:
            ll.llama_sampler_chain_add(chain, smpl)

        biases = dict(params.logit_bias)
        for token in banned:
            biases[token] = -math.inf
        if biases:
            arr = (ll.llama_logit_bias * len(biases))()
            for i, (token, bias) in enumerate(biases.items()):
                arr[i] = ll.llama_logit_bias(token, bias)
            add(ll.llama_sampler_init_logit_bias(model.n_vocab, len(biases), arr))
        if (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                or params.presence_penalty != 0.0):
            add(ll.llama_sampler_init_penalties(
                model.n_vocab, params.penalty_last_n, params.repetition_penalty,
                params.frequency_penalty, params.presence_penalty))
        if params.grammar:
            grammar = ll.llama_sampler_init_grammar(model.vocab, params.grammar.encode(),
                                                    b"root")
            if not grammar:
                ll.llama_sampler_free(chain)
                self.ptr = None
                raise ValueError("llama.cpp refused the grammar")
            self.grammar = grammar
        if params.greedy:
            add(ll.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(ll.llama_sampler_init_min_p(params.min_p, 1))
        add(ll.llama_sampler_init_temp(params.temperature))
        add(ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: Context, batch_index: int) -> int:
        if self.grammar is None:
            # llama_sampler_sample applies the chain to the logits row and accepts the token.
            token: int = ll.llama_sampler_sample(self.ptr, ctx.ptr, batch_index)
            return token
        logits = ll.llama_get_logits_ith(ctx.ptr, batch_index)
        token = self._apply(logits, constrained=False)
        one = np.array([(token, 0.0, 0.0)], dtype=_TOKEN_DATA)
        single = ll.llama_token_data_array(
            data=one.ctypes.data_as(ll.llama_token_data_p), size=1, selected=-1, sorted=False)
        ll.llama_sampler_apply(self.grammar, ctypes.byref(single))
        if not math.isfinite(float(one["logit"][0])):  # refused: constrain the row, again
            token = self._apply(logits, constrained=True)
        ll.llama_sampler_accept(self.grammar, token)
        ll.llama_sampler_accept(self.ptr, token)
        return token

    def _apply(self, logits: Any, *, constrained: bool) -> int:
        """The chain's choice over a fresh copy of the row (the grammar first if constrained)."""
        row = self._row
        if row is None:
            row = self._row = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        row["id"] = np.arange(self.n_vocab, dtype=np.int32)
        row["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        row["p"] = 0.0
        cur = ll.llama_token_data_array(
            data=row.ctypes.data_as(ll.llama_token_data_p), size=self.n_vocab, selected=-1,
            sorted=False)
        if constrained:
            assert self.grammar is not None
            ll.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        ll.llama_sampler_apply(self.ptr, ctypes.byref(cur))
        # a sampler may point `data` at a buffer of its own: read the choice through it
        return int(cur.data[cur.selected].id)

    def free(self) -> None:
        if self.ptr:
            ll.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            ll.llama_sampler_free(self.grammar)
            self.grammar = None


# llama_token_data as numpy sees it: id, logit, p (12 bytes, no padding)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Batch:
    """A llama_batch whose arrays are numpy-owned, so a step fills it with slice assignments."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_base = self.seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(ll.llama_seq_id) * capacity)(
            *[ctypes.cast(seq_base + 4 * i, ctypes.POINTER(ll.llama_seq_id))
              for i in range(capacity)])
        # Pointers into the numpy arrays (llama_cpp annotates these fields as arrays).
        self.struct = ll.llama_batch(
            token=self.token.ctypes.data_as(ctypes.POINTER(ll.llama_token)),
            embd=ctypes.POINTER(ctypes.c_float)(),
            pos=self.pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(ll.llama_seq_id))),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: Sequence[int], start_pos: int, seq_id: int,
            want_last_logits: bool) -> int:
        """Append tokens of one sequence; returns the batch index of the last one."""
        n, k = self.n, len(tokens)
        self.token[n:n + k] = tokens
        self.pos[n:n + k] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq[n:n + k] = seq_id
        self.logits[n:n + k] = 0
        if want_last_logits:
            self.logits[n + k - 1] = 1
        self.n = n + k
        return n + k - 1

    def request_logits(self, start: int, stop: int) -> None:
        """Ask for the logits of batch rows start..stop-1 too (prompt logprobs)."""
        self.logits[start:stop] = 1


class Context:
    """A llama.cpp context for n_seq_max sequences: one KV pool of n_ctx cells they all share
    (unified), or one stream of n_ctx / n_seq_max cells each (kv_unified=False)."""

    def __init__(self, model: Model, *, n_ctx: int, n_seq_max: int, n_batch: int,
                 n_threads: int, n_threads_batch: int | None = None,
                 embeddings: bool = False, pooling_type: int | None = None,
                 kv_unified: bool = True, placement: Placement | None = None) -> None:
        place = placement or Placement()
        params = ll.llama_context_default_params()
        params.type_k = hardware.KV_TYPES[place.cache_type_k][0]
        params.type_v = hardware.KV_TYPES[place.cache_type_v][0]
        params.flash_attn_type = hardware.FLASH_ATTN[place.flash_attn]
        params.offload_kqv = place.kv_offload
        params.op_offload = place.op_offload
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch or n_threads
        # Unified: sequences share cells, so seq_cp of a prefix costs no memory, but every
        # sequence's attention walks the whole pool's used span. Split: each sequence attends
        # over its own stream only, and copying a prefix copies a stream's data.
        params.kv_unified = kv_unified
        params.swa_full = True  # sliding-window layers keep full KV, so prefixes can be trimmed
        params.no_perf = True
        params.embeddings = embeddings
        if pooling_type is not None:
            params.pooling_type = pooling_type
        ctx = ll.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.ptr = ctx
        self.model = model
        self.placement = place
        self.unified = kv_unified
        self.n_ctx = ll.llama_n_ctx_seq(ctx)  # the room of one sequence (all of it if unified)
        self.n_batch = n_batch
        self.n_threads = n_threads
        self._threads = (n_threads, n_threads_batch or n_threads)  # as configured
        self.memory = ll.llama_get_memory(ctx)
        # KV streams (one per sequence when split), and whether kv_state can re-stream this
        # memory's states (a recurrent or hybrid model's have another format; they stay as
        # llama.cpp writes them)
        self._n_stream = 1 if kv_unified else n_seq_max
        self._portable = not (ll.llama_model_is_recurrent(model.ptr)
                              or ll.llama_model_is_hybrid(model.ptr))
        self.batch = Batch(n_batch)
        self.eog_tokens = model.eog_tokens
        self.piece = model.piece
        self.token_bytes = model.token_bytes
        self.n_vocab = model.n_vocab
        self.projector: Projector | None = None  # set by the service when one is loaded

    def make_sampler(self, params: SamplingParams, seed: int, banned: Iterable[int]) -> Sampler:
        return Sampler(self.model, params, seed=seed, banned=list(banned))

    def set_adapters(self, adapters: Sequence[tuple[str, float]]) -> None:
        """Apply loaded LoRA adapters ((path, scale), ...) to every following decode."""
        n = len(adapters)
        ptrs = (ll.llama_adapter_lora_p_ctypes * n)(*[self.model.loras[p] for p, _ in adapters])
        scales = (ctypes.c_float * n)(*[scale for _, scale in adapters])
        if ll.llama_set_adapters_lora(self.ptr, ptrs if n else None, n, scales if n else None):
            raise RuntimeError("llama.cpp refused the LoRA adapters")

    def set_threads(self, n: int) -> None:
        """Threads for the following decodes (a prefill lane borrows some: engine.lane); the
        configured count restores the configured --threads-batch too."""
        if n != self.n_threads:
            ll.llama_set_n_threads(self.ptr, n, self._threads[1] if n == self._threads[0] else n)
            self.n_threads = n

    def decode(self, batch: Batch) -> int:
        batch.struct.n_tokens = batch.n
        status: int = ll.llama_decode(self.ptr, batch.struct)
        return status

    def decode_media(self, span: MediaSpan, seq_id: int) -> tuple[int, bool]:
        """Encode an image (or take its cached embeddings) and decode them into `seq_id`'s KV
        at positions span.start..span.end-1, in batches of n_batch: (status, cache hit)."""
        projector = self.projector
        chunk = span.chunk
        assert projector is not None and isinstance(chunk, MediaChunk)
        embd, hit = projector.embeddings(span)
        new_pos = ll.llama_pos(0)
        status = mtmd.mtmd_helper_decode_image_chunk(
            projector.ptr, self.ptr, chunk.ptr, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            span.start, seq_id, self.n_batch, ctypes.byref(new_pos),
            mtmd.mtmd_helper_post_decode_callback(0), None)
        return int(status), hit

    def logits_row(self, batch_index: int) -> np.ndarray:
        """The logits of a batch row decoded with logits: a view over llama.cpp's buffer (no
        copy), valid until the next decode."""
        ptr = ll.llama_get_logits_ith(self.ptr, batch_index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch row {batch_index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- KV memory --------------------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(ll.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        if self.unified:
            ll.llama_memory_seq_cp(self.memory, src, dst, p0, p1)
            return
        # Between streams llama.cpp copies only whole sequences (it asserts otherwise): copy
        # all of src (the data moves at the next decode), then drop what is past p1.
        ll.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        if p1 >= 0:
            ll.llama_memory_seq_rm(self.memory, dst, p1, -1)

    def clear(self) -> None:
        ll.llama_memory_clear(self.memory, True)

    # -- sequence states (the disk cache) ---------------------------------------------------
    def state_seq_size(self, seq_id: int) -> int:
        return int(ll.llama_state_seq_get_size(self.ptr, seq_id))

    def state_seq_get(self, seq_id: int) -> bytearray:
        """A copy of the sequence's KV cells (positions, data): llama.cpp's serialisation, in
        kv_state's envelope that loads under any KV layout."""
        size = self.state_seq_size(seq_id)
        data = bytearray(size)
        n = ll.llama_state_seq_get_data(self.ptr, (ctypes.c_uint8 * size).from_buffer(data),
                                        size, seq_id) if size else 0
        if n != size:
            data = data[:n]
        if not n or not self._portable:
            return data
        # a KV cache with sliding-window layers writes its windowed cache last, alone (after
        # the header) when asked for the partial state: that length tells where the
        # full-attention one ends
        windowed = int(ll.llama_state_seq_get_size_ext(
            self.ptr, seq_id, ll.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)) - kv_state.LLAMA_HEADER
        return kv_state.portable(data, self._n_stream, 0 if self.unified else seq_id,
                                 last_section=windowed if windowed < n - kv_state.LLAMA_HEADER
                                 else 0)

    def state_seq_set(self, seq_id: int, data: bytearray) -> int:
        """Load a saved state (state_seq_get's) into `seq_id`; 0 when llama.cpp refused it
        (no room, another format), and then the sequence holds nothing."""
        if self._portable:
            try:
                data = kv_state.native(data, self._n_stream, 0 if self.unified else seq_id)
            except kv_state.StateFormatError as exc:
                log.warning("a saved KV state was refused: %s", exc)
                self.seq_rm(seq_id, -1, -1)
                return 0
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        return int(ll.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id))

    def state_format(self) -> str:
        """What, besides the model file, decides whether a saved state loads here: the KV
        element types (as llama.cpp numbers them, so f16 states written before the types
        could be chosen still match), and kv_state's envelope (v1), in which a sequence's
        state loads under any KV layout, so the layout is not part of it."""
        type_k = hardware.KV_TYPES[self.placement.cache_type_k][0]
        type_v = hardware.KV_TYPES[self.placement.cache_type_v][0]
        envelope = "; envelope lmkv1" if self._portable else ""
        return f"llama-cpp-python {ll.__version__}; kv {type_k}/{type_v}; swa_full{envelope}"

    # -- embeddings -------------------------------------------------------------------------
    def sequence_embedding(self, seq_id: int) -> np.ndarray:
        ptr = ll.llama_get_embeddings_seq(self.ptr, seq_id)
        n_embd = self.model.info.n_embd
        return np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()

    def pooling_type(self) -> int:
        return int(ll.llama_pooling_type(self.ptr))

    def close(self) -> None:
        if self.ptr:
            ll.llama_free(self.ptr)
            self.ptr = None


# -- MTP / NextN drafting (engine.mtp_draft) ---------------------------------------------------
# llama.cpp declares the hidden-state accessors MTP drafting needs in its staging header
# src/llama-ext.h, as C++ functions: libllama exports them under their mangled names and
# llama-cpp-python binds none of them. They take and return plain C types, so ctypes calls
# them by those names (Itanium C++ ABI, as GCC and Clang build libllama on Linux and macOS).
_EXT_FUNCTIONS: dict[str, tuple[str, Any, list[Any]]] = {
    # void llama_set_embeddings_nextn(llama_context *, bool value, bool masked)
    "set_embeddings_nextn": ("_Z26llama_set_embeddings_nextnP13llama_contextbb", None,
                             [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool]),
    # float * llama_get_embeddings_nextn(llama_context *)
    "get_embeddings_nextn": ("_Z26llama_get_embeddings_nextnP13llama_context",
                             ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
    # float * llama_get_embeddings_nextn_ith(llama_context *, int32_t i)
    "get_embeddings_nextn_ith": ("_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
                                 ctypes.POINTER(ctypes.c_float),
                                 [ctypes.c_void_p, ctypes.c_int32]),
}
_ext_cache: dict[str, Any] = {}


def _ext(name: str) -> Any:
    """One of llama-ext.h's functions (above), bound on first use; RuntimeError when this
    libllama does not export it."""
    fn = _ext_cache.get(name)
    if fn is None:
        symbol, restype, argtypes = _EXT_FUNCTIONS[name]
        try:
            fn = ll.llama_cpp._lib[symbol]
        except (AttributeError, KeyError) as exc:  # ctypes raises AttributeError
            raise RuntimeError(f"this llama.cpp build does not export llama_{name}, which "
                               f"MTP drafting needs") from exc
        fn.restype, fn.argtypes = restype, argtypes
        _ext_cache[name] = fn
    return fn


def mtp_supported() -> bool:
    """Whether this libllama exports what MTP drafting needs."""
    try:
        for name in _EXT_FUNCTIONS:
            _ext(name)
    except RuntimeError:
        return False
    return True


def enable_hidden_rows(ctx: Context) -> None:
    """Make every following decode of `ctx` keep the hidden state that feeds the MTP head
    (the output norm's input, llama.cpp's h_nextn) for every batch row, logits or not."""
    _ext("set_embeddings_nextn")(ctx.ptr, True, False)


def hidden_rows(ctx: Context, start: int, n: int) -> np.ndarray:
    """A copy of the hidden states of batch rows start..start+n-1 of the last decode
    (enable_hidden_rows first): n rows of n_embd floats."""
    ptr = _ext("get_embeddings_nextn")(ctx.ptr)
    if not ptr:
        raise RuntimeError("llama.cpp kept no hidden states (enable_hidden_rows)")
    width = int(ll.llama_model_n_embd_out(ctx.model.ptr))
    rows = np.ctypeslib.as_array(ptr, shape=(start + n, width))
    return rows[start:start + n].copy()


class MtpContext:
    """A context of type LLAMA_CONTEXT_TYPE_MTP over a target model loaded with its NextN
    layers: its KV holds those layers' entries only, and each row it decodes is a token with
    the hidden state that preceded it (the target's, or the head's own while drafting). It
    offers what engine.mtp_draft.MtpDrafter needs."""

    def __init__(self, target: Context, *, n_ctx: int, n_seq_max: int, n_batch: int,
                 n_threads: int, n_threads_batch: int | None = None,
                 kv_unified: bool = True) -> None:
        model, place = target.model, target.placement
        params = ll.llama_context_default_params()
        params.ctx_type = ll.LLAMA_CONTEXT_TYPE_MTP
        params.ctx_other = target.ptr
        params.type_k = hardware.KV_TYPES[place.cache_type_k][0]
        params.type_v = hardware.KV_TYPES[place.cache_type_v][0]
        params.flash_attn_type = hardware.FLASH_ATTN[place.flash_attn]
        params.offload_kqv = place.kv_offload
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch or n_threads
        params.kv_unified = kv_unified
        params.no_perf = True
        ctx = ll.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create the MTP context (a model loaded "
                               "without its NextN layers, or out of memory)")
        self.ptr = ctx
        self.model = model
        self.capacity = n_batch
        self.n_embd = int(ll.llama_model_n_embd_out(model.ptr))  # the rows' width
        self.n_vocab = model.n_vocab
        self.memory = ll.llama_get_memory(ctx)
        _ext("set_embeddings_nextn")(ctx, True, True)  # the head's own state, on output rows
        self._batch = ll.llama_batch_ext_init(ctx)
        self._pos = (ll.llama_pos * 1)()

    def decode(self, rows: Sequence[tuple[int, int, int, bool]], hidden: np.ndarray) -> int:
        """Decode rows (token, position, seq_id, logits?), row i paired with hidden[i]."""
        batch = self._batch
        ll.llama_batch_ext_clear(batch)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        base = hidden.ctypes.data
        step = self.n_embd * 4
        for i, (token, pos, seq_id, logits) in enumerate(rows):
            idx = ll.llama_batch_ext_add_token(batch, seq_id, token)
            if idx < 0:
                return -1
            self._pos[0] = pos
            ll.llama_batch_ext_set_pos(batch, idx, self._pos)
            embd = ll.llama_embd(ctypes.cast(base + i * step, ctypes.POINTER(ctypes.c_float)),
                                 1, self.n_embd)
            if not ll.llama_batch_ext_set_embd_token(batch, idx, embd):
                return -1
            if logits:
                ll.llama_batch_ext_set_output_logits(batch, idx, True)
        status: int = ll.llama_process(self.ptr, ll.LLAMA_PROCESS_TYPE_DECODE, batch)
        return status

    def logits_row(self, batch_index: int) -> np.ndarray:
        ptr = ll.llama_get_logits_ith(self.ptr, batch_index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no MTP logits for batch row {batch_index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def hidden_row(self, batch_index: int) -> np.ndarray:
        """The head's hidden state on an output row of the last decode (a copy): what the
        next drafted row is paired with."""
        ptr = _ext("get_embeddings_nextn_ith")(self.ptr, batch_index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no MTP state for batch row {batch_index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(ll.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def clear(self) -> None:
        ll.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self._batch:
            ll.llama_batch_ext_free(self._batch)
            self._batch = None
        if self.ptr:
            ll.llama_free(self.ptr)
            self.ptr = None


POOLING_MEAN = ll.LLAMA_POOLING_TYPE_MEAN
POOLING_NONE = ll.LLAMA_POOLING_TYPE_NONE
POOLING_UNSPECIFIED = ll.LLAMA_POOLING_TYPE_UNSPECIFIED


class GrammarSampler(Sampler):
    """A greedy chain constrained by a GBNF grammar; ValueError if llama.cpp refuses it."""

    def __init__(self, model: Model, gbnf: str) -> None:
        super().__init__(model, SamplingParams(temperature=0.0, grammar=gbnf), seed=0)


def validate_grammar(model: Model, gbnf: str) -> None:
    """Raise ValueError unless llama.cpp's grammar parser accepts `gbnf` for this vocabulary."""
    GrammarSampler(model, gbnf).free()
