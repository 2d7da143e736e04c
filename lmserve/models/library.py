"""The model library: GGUF files found in directories, the Hugging Face hub cache and Ollama's
local store, listed from their headers alone (nothing is loaded to list them).

Each file becomes a `LibraryEntry`: a name, the GGUF path (the first shard of a sharded
model), the header, and, for a file that cannot be a model (not GGUF, truncated, a shard
missing), the reason instead, so the listing shows it as failed and a request for it gets
that reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmserve.engine import hardware, kv_layout
from lmserve.models import projectors as projectors_of
from lmserve.models.gguf_header import GGUFError, GGUFHeader, read_header

log = logging.getLogger("lmserve.models")

SOURCES = ("hf", "ollama")  # what --discover may name
_SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_OLLAMA_HOST = "registry.ollama.ai"
_OLLAMA_MEDIA = "application/vnd.ollama.image."
# Ollama's params (a Modelfile's PARAMETER lines) that lmserve honours, by its own names.
_OLLAMA_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                  "min_p": "min_p", "seed": "seed", "stop": "stop",
                  "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                  "frequency_penalty": "frequency_penalty", "num_predict": "max_tokens"}


@dataclass(frozen=True)
class LibraryEntry:
    """One model of the library, as listed before anything is loaded."""

    name: str
    path: str  # the GGUF (a sharded model's first shard; llama.cpp finds the others)
    source: str  # dir | huggingface | ollama | config | cli
    aliases: tuple[str, ...] = ()
    header: GGUFHeader | None = None
    error: str | None = None  # why it cannot be loaded (not GGUF, truncated, shard missing)
    size_bytes: int = 0  # every shard
    modified: float = 0.0  # the file's mtime
    defaults: Mapping[str, Any] = field(default_factory=dict)  # generation defaults (Ollama)
    n_ctx: int | None = None  # a context the source asks for (Ollama's num_ctx)
    system: str | None = None  # a default system prompt (Ollama's system layer)
    files: tuple[str, ...] = ()  # every file of a sharded model
    mmproj: str | None = None  # the vision projector found for it (models.projectors)

    @property
    def key(self) -> str:
        """What identifies the file: two names of one file share one loaded model."""
        return os.path.realpath(self.path)


def inspect(name: str, path: str, source: str, *, aliases: Iterable[str] = (),
            shards: Iterable[str] = (), missing: str | None = None) -> LibraryEntry:
    """An entry from the file's header; a file that is no loadable GGUF is an entry with an
    error. `shards`: every file of a sharded model (their sizes add up)."""
    files = list(shards) or [path]
    if len(files) > 1:
        return replace(_inspect(name, path, source, aliases, files, missing), files=tuple(files))
    return _inspect(name, path, source, aliases, files, missing)


def _inspect(name: str, path: str, source: str, aliases: Iterable[str], files: list[str],
             missing: str | None) -> LibraryEntry:
    if missing:
        present = [f for f in files if os.path.exists(f)]
        return LibraryEntry(name, path, source, tuple(aliases), error=missing,
                            size_bytes=sum(os.path.getsize(f) for f in present))
    try:
        stat = os.stat(path)
        size = sum(os.path.getsize(f) for f in files)
    except OSError as exc:
        return LibraryEntry(name, path, source, tuple(aliases),
                            error=f"cannot read {path}: {exc.strerror or exc}")
    try:
        header = read_header(path, check_data=len(files) == 1)
    except (GGUFError, OSError) as exc:
        return LibraryEntry(name, path, source, tuple(aliases), error=str(exc), size_bytes=size,
                            modified=stat.st_mtime)
    return LibraryEntry(name, path, source, tuple(aliases), header=header, size_bytes=size,
                        modified=stat.st_mtime)


Found = tuple[str, Path, list[Path], str | None, Path | None]


def _ggufs(root: Path, *, one_model: bool = False) -> list[Found]:
    """(stem, first file, every file, what is missing, its vision projector) for each model
    under `root`: a shard set is one model; *mmproj* files are projectors, not models, given
    to the models of their folder they belong to (models.projectors; `one_model`: the files
    are one model's quantizations)."""
    found: list[Found] = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        folder = _folder(Path(dirpath), sorted(files))
        projectors = [Path(dirpath) / f for f in files if projectors_of.is_projector(f)]
        chosen, stray = projectors_of.match([stem for stem, *_ in folder], projectors,
                                            one_model=one_model)
        projectors_of.report_unattached(stray)
        found += [(*model, projector) for model, projector in zip(folder, chosen, strict=True)]
    return sorted(found, key=lambda item: str(item[1]))


def _folder(directory: Path, files: list[str]) -> list[tuple[str, Path, list[Path], str | None]]:
    """The models of one folder's files (a shard set is one model)."""
    singles: list[tuple[str, Path, list[Path], str | None]] = []
    sets: dict[tuple[str, int], dict[int, Path]] = {}
    for file in files:
        if not file.lower().endswith(".gguf") or projectors_of.is_projector(file):
            continue
        path = directory / file
        shard = _SHARD.match(file)
        if shard:
            sets.setdefault((shard["base"], int(shard["count"])), {})[int(shard["index"])] = path
        else:
            singles.append((path.stem, path, [path], None))
    for (base, count), parts in sets.items():
        absent = [i for i in range(1, count + 1) if i not in parts]
        first = parts.get(1) or directory / f"{base}-00001-of-{count:05d}.gguf"
        missing = (f"{base}: shard(s) {', '.join(map(str, absent))} of {count} missing"
                   if absent else None)
        singles.append((base, first, [parts[i] for i in sorted(parts)], missing))
    return singles


def projector_for(model_path: str) -> str | None:
    """The vision projector of a model given by its path (on the command line, in a model's
    section, an app's model): the projector of its folder that belongs to it, if any."""
    path = Path(os.path.abspath(os.path.expanduser(model_path)))
    try:
        files = sorted(os.listdir(path.parent))
    except OSError:
        return None
    projectors = [path.parent / f for f in files if projectors_of.is_projector(f)]
    if not projectors:
        return None
    stems = [stem for stem, *_ in _folder(path.parent, files)]
    shard = _SHARD.match(path.name)
    own = shard["base"] if shard else path.stem
    if own not in stems:  # a file not named .gguf (an Ollama blob given by its path)
        stems.append(own)
    chosen, _ = projectors_of.match(stems, projectors)
    found = chosen[stems.index(own)]
    return str(found) if found is not None else None


def scan_dir(directory: str) -> list[LibraryEntry]:
    """Every GGUF model under `directory` (subdirectories too), named by its file stem,
    lowercased (`alpha.gguf` is `alpha`)."""
    root = Path(os.path.expanduser(directory))
    if not root.is_dir():
        raise ValueError(f"--models-dir {directory}: not a directory")
    entries = []
    for stem, first, files, missing, projector in _ggufs(root):
        entry = inspect(stem.lower(), str(first), "dir", shards=[str(f) for f in files],
                        missing=missing)
        entries.append(replace(entry, mmproj=str(projector) if projector else None))
    return entries


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def scan_hf_cache(root: Path | None = None) -> list[LibraryEntry]:
    """GGUF files in the hub cache's snapshots (the revision refs/main names, else the newest
    snapshot), named `owner/repo:file-stem`; the stem alone is a short name when no other
    model has it (see `unique_names`)."""
    root = root or hf_cache_dir()
    entries: list[LibraryEntry] = []
    if not root.is_dir():
        return entries
    for repo_dir in sorted(root.glob("models--*")):
        repo_id = repo_dir.name[len("models--"):].replace("--", "/", 1)
        snapshot = _snapshot(repo_dir)
        if snapshot is None:
            continue
        for stem, first, files, missing, projector in _ggufs(snapshot, one_model=True):
            entry = inspect(f"{repo_id}:{stem}", str(first), "huggingface",
                            aliases=[stem.lower()], shards=[str(f) for f in files],
                            missing=missing)
            entries.append(replace(entry, mmproj=str(projector) if projector else None))
    return entries


def _snapshot(repo_dir: Path) -> Path | None:
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = repo_dir / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if candidate.is_dir():
            return candidate
    snapshots = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def ollama_dir() -> Path:
    if os.environ.get("OLLAMA_MODELS"):
        return Path(os.environ["OLLAMA_MODELS"])
    return Path.home() / ".ollama" / "models"


def scan_ollama(root: Path | None = None) -> list[LibraryEntry]:
    """Ollama's store: each manifest under manifests/HOST/NAMESPACE/MODEL/TAG names its layers;
    the model layer's blob is the GGUF, the params and system layers become the model's
    defaults, a projector layer its vision projector. Named as Ollama names them:
    `smollm2:135m` (library models of Ollama's own registry), `NAMESPACE/MODEL:TAG`, or
    `HOST/NAMESPACE/MODEL:TAG`."""
    root = root or ollama_dir()
    manifests = root / "manifests"
    entries: list[LibraryEntry] = []
    if not manifests.is_dir():
        return entries
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        parts = manifest.relative_to(manifests).parts
        if len(parts) != 4:
            continue
        host, namespace, model, tag = parts
        prefix = ("" if namespace == "library" else f"{namespace}/") if host == _OLLAMA_HOST \
            else f"{host}/{namespace}/"
        name = f"{prefix}{model}:{tag}"
        aliases = [f"{prefix}{model}"] if tag == "latest" else []
        entries.append(_ollama_entry(root, manifest, name, aliases))
    return entries


def _ollama_entry(root: Path, manifest: Path, name: str, aliases: list[str]) -> LibraryEntry:
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        by_type = {str(layer["mediaType"]).removeprefix(_OLLAMA_MEDIA): str(layer["digest"])
                   for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return LibraryEntry(name, str(manifest), "ollama", tuple(aliases),
                            error=f"unreadable Ollama manifest {manifest}: {exc}")
    if "model" not in by_type:
        return LibraryEntry(name, str(manifest), "ollama", tuple(aliases),
                            error=f"the Ollama manifest {manifest} has no model layer")
    entry = inspect(name, str(_blob(root, by_type["model"])), "ollama", aliases=aliases)
    defaults: dict[str, Any] = {}
    n_ctx = None
    if "params" in by_type:
        try:
            params = json.loads(_blob(root, by_type["params"]).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: Ollama params layer unreadable: %s", name, exc)
            params = {}
        for key, value in (params.items() if isinstance(params, dict) else ()):
            if key in _OLLAMA_PARAMS:
                defaults[_OLLAMA_PARAMS[key]] = value
            elif key == "num_ctx" and isinstance(value, int) and value > 0:
                n_ctx = value
            else:
                log.info("%s: Ollama parameter %s is not used by lmserve", name, key)
    system = None
    if "system" in by_type:
        try:
            system = _blob(root, by_type["system"]).read_text(encoding="utf-8")
        except OSError as exc:
            log.warning("%s: Ollama system layer unreadable: %s", name, exc)
    if "template" in by_type:  # a Go template: lmserve renders the GGUF's own Jinja template
        log.debug("%s: Ollama's Go template is not used; the GGUF's template is", name)
    mmproj = None
    if "projector" in by_type:  # the model's vision projector, a layer of its own
        blob = _blob(root, by_type["projector"])
        if blob.is_file():
            mmproj = str(blob)
        else:
            log.warning("%s: Ollama projector layer %s is missing", name, blob)
    return replace(entry, defaults=defaults, n_ctx=n_ctx, system=system, mmproj=mmproj)


def _blob(root: Path, digest: str) -> Path:
    dashed = root / "blobs" / digest.replace(":", "-")
    return dashed if dashed.exists() or not (root / "blobs" / digest).exists() \
        else root / "blobs" / digest


def discover(sources: Iterable[str]) -> list[LibraryEntry]:
    """The entries of each named source (hf, ollama)."""
    entries: list[LibraryEntry] = []
    for source in sources:
        if source == "hf":
            entries += scan_hf_cache()
        elif source == "ollama":
            entries += scan_ollama()
        else:
            raise ValueError(f"discover: unknown source {source!r} (choose from "
                             f"{', '.join(SOURCES)})")
    return entries


def unique_names(entries: list[LibraryEntry], taken: Iterable[str] = ()) -> list[LibraryEntry]:
    """Entries whose names clash with a name already taken (or an earlier entry's) get a
    numbered name; an alias two entries share is dropped from both (a short name is only
    given when unambiguous)."""
    used = set(taken)
    alias_count: dict[str, int] = {}
    for entry in entries:
        for alias in entry.aliases:
            alias_count[alias] = alias_count.get(alias, 0) + 1
    out = []
    for entry in entries:
        name, n = entry.name, 2
        while name in used:
            name, n = f"{entry.name}-{n}", n + 1
        used.add(name)
        aliases = tuple(a for a in entry.aliases
                        if alias_count[a] == 1 and a not in used and a != name)
        used.update(aliases)
        out.append(replace(entry, name=name, aliases=aliases))
    return out


@dataclass(frozen=True)
class MemoryNeed:
    """A model's estimate split by where it lives: RAM (--memory-budget) and the GPUs' memory
    (--vram-budget)."""

    ram: int
    vram: int = 0

    @property
    def total(self) -> int:
        return self.ram + self.vram


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model takes once loaded, from its header as /v1/plan estimates them."""

    weights: int  # the file
    kv: int  # the KV cache (split layout: a stream of n_ctx cells per slot)
    compute: int  # one micro-batch of float activations and logits
    n_layer: int = 0  # the header's repeating blocks, which GPU offload counts (0: unknown)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    def split(self, offload: hardware.Offload) -> MemoryNeed:
        """RAM and VRAM under this placement: the offloaded layers' share of the weights and
        the KV cache with them (engine.hardware, as /v1/plan and /api/ps count them) are
        VRAM, the rest (the compute buffer included) RAM."""
        vram = min(offload.vram_bytes(self.weights, self.kv), self.total)
        return MemoryNeed(ram=self.total - vram, vram=vram)


def memory_estimate(header: GGUFHeader | None, size_bytes: int, *, n_ctx: int, n_slots: int,
                    kv_setting: str, step_tokens: int, cache_type_k: str = "f16",
                    cache_type_v: str = "f16", lane: bool = False) -> MemoryEstimate:
    """Bytes a model takes once loaded, from its header as /v1/plan estimates them: the
    weights (the file), the KV cache in its element types (split: a stream of n_ctx cells
    per slot; `lane`: n_ctx more for the prefill lane's side context), and one micro-batch
    of float activations and logits."""
    if header is None:
        return MemoryEstimate(size_bytes, 0, 0)
    metadata = header.metadata
    per_token = kv_layout.bytes_per_token_from_metadata(metadata, cache_type_k,
                                                        cache_type_v) or 0
    layout = kv_layout.choose(kv_setting, bytes_per_token=per_token or None, n_ctx=n_ctx,
                              n_slots=n_slots, memory=kv_layout.machine_memory())
    cells = n_ctx * (n_slots if layout.split else 1) + (n_ctx if lane else 0)
    arch = header.architecture
    n_embd = int(metadata.get(f"{arch}.embedding_length", 0) or 0)
    n_vocab = int(metadata.get("tokenizer.ggml.tokens", 0) or 0)  # the array's length
    try:
        n_layer = int(metadata.get(f"{arch}.block_count", 0) or 0)
    except (TypeError, ValueError):
        n_layer = 0
    compute = step_tokens * (n_vocab + 2 * n_embd) * 4
    return MemoryEstimate(size_bytes, cells * per_token, compute, n_layer)


def context_of(header: GGUFHeader | None, configured: int | None) -> int:
    """The context a model gets when loaded: the configured one, else its training context
    capped (kv_layout.default_ctx, what ModelService does)."""
    if configured:
        return configured
    return kv_layout.default_ctx(header.context_length if header is not None else None)


# -- the server's library settings (config file keys, LMSERVE_* variables and flags) ---------

@dataclass(frozen=True)
class LibrarySettings:
    """Where the library comes from and how many of its models may be loaded at once."""

    models_dirs: tuple[str, ...] = ()  # directories of GGUF files (--models-dir)
    discover: tuple[str, ...] = ()  # other stores to list: hf, ollama (--discover)
    max_loaded: int | None = None  # most models loaded at once; None: 3, or more at start
    memory_budget: int | None = None  # RAM the loaded models may take (estimated)
    vram_budget: int | None = None  # GPU memory the loaded models may take (estimated)
    keep_alive: float = 300.0  # seconds an idle on-demand model stays loaded; < 0: forever
    load_timeout: float = 600.0  # seconds a request waits for its model's load


LIBRARY_KEYS = ("models_dir", "models_dirs", "discover", "max_loaded", "memory_budget",
                "vram_budget", "keep_alive", "load_timeout")


def library_settings(values: Mapping[str, Any]) -> LibrarySettings:
    """The settings from merged configuration values (strings from the environment, lists
    or strings from a file, typed values from flags); a bad value is a ValueError naming
    its key."""
    from lmserve.core.errors import LmserveError
    from lmserve.core.lifecycle import keep_alive_seconds

    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            if key in ("models_dir", "models_dirs"):
                dirs = [value] if isinstance(value, str) else list(value)
                out["models_dirs"] = (*out.get("models_dirs", ()), *map(str, dirs))
            elif key == "discover":
                items = value.split(",") if isinstance(value, str) else \
                    [p for v in value for p in str(v).split(",")]
                sources = tuple(s.strip() for s in items if s.strip())
                unknown = [s for s in sources if s not in SOURCES]
                if unknown:
                    raise ValueError(f"unknown source(s) {', '.join(unknown)} (choose from "
                                     f"{', '.join(SOURCES)})")
                out["discover"] = sources
            elif key == "max_loaded":
                if isinstance(value, bool) or int(value) < 1:
                    raise ValueError("must be a number of models, at least 1")
                out["max_loaded"] = int(value)
            elif key == "memory_budget":
                out["memory_budget"] = memory_budget(value)
            elif key == "vram_budget":
                out["vram_budget"] = vram_budget(value)
            elif key in ("keep_alive", "load_timeout"):
                seconds = keep_alive_seconds(value, key)
                assert seconds is not None
                if key == "load_timeout" and seconds <= 0:
                    raise ValueError("must be more than 0 seconds")
                out[key] = seconds
        except (LmserveError, ValueError, TypeError) as exc:
            reason = exc.message if isinstance(exc, LmserveError) else str(exc)
            raise ValueError(f"{key}: {reason} (got {value!r})") from None
    return LibrarySettings(**out)


def memory_budget(value: Any) -> int:
    """Bytes ("8G", "512M", 8000000000) or a fraction of the machine's memory ("0.5")."""
    return _budget(value, kv_layout.machine_memory, "the machine's memory is unknown")


def vram_budget(value: Any) -> int:
    """Bytes ("8G") or a fraction ("0.9") of the total memory of the GPUs llama.cpp lists;
    a fraction without a GPU is a ValueError."""
    def total() -> int | None:
        from lmserve.service import gpu_facts

        devices = gpu_facts()[1]
        return sum(d.total for d in devices) or None

    return _budget(value, total, "no GPU found")


def _budget(value: Any, whole: Callable[[], int | None], unknown: str) -> int:
    from lmserve.engine.disk_cache import ByteSize

    text = str(value).strip()
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None and 0 < fraction <= 1:
        memory = whole()
        if memory is None:
            raise ValueError(f"{unknown}; give bytes (8G)")
        return int(memory * fraction)
    size = int(ByteSize(text))
    if size < 1:
        raise ValueError("must be bytes (8G) or a fraction of memory (0.5)")
    return size
