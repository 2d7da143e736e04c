"""Command line: `lmserve serve [MODEL ...]` and `lmserve bench`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from lmserve import config
from lmserve._version import __version__
from lmserve.cluster import add_arguments as cluster_arguments
from lmserve.core.lora import assign as assign_loras
from lmserve.engine.disk_cache import ByteSize
from lmserve.models.resolve import DEFAULT_MODEL, resolve


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="GGUF path, bundled name (smollm2), or hf://owner/repo/file.gguf; "
                        "NAME=MODEL to choose the served name. Default: smollm2")
    p.add_argument("--config", help="JSON or TOML configuration file")
    p.add_argument("--models-dir", action="append", dest="models_dirs", metavar="DIR",
                   help="serve every GGUF under DIR by its file stem (alpha.gguf is alpha), "
                        "listed at start and loaded when a request asks for it; repeatable")
    p.add_argument("--discover", action="append", metavar="hf,ollama",
                   help="also list the GGUFs of the Hugging Face hub cache (hf) and Ollama's "
                        "store (ollama), loaded on demand (default: neither)")
    p.add_argument("--max-loaded", type=int, metavar="N",
                   help="most models loaded at once; loading another unloads the least "
                        "recently used idle one (default 3, or the models loaded at start)")
    p.add_argument("--memory-budget", metavar="SIZE|FRACTION",
                   help="RAM the loaded models may take, estimated from their GGUF headers "
                        "as /v1/plan does (the layers and KV cache offloaded to a GPU count "
                        "against --vram-budget instead): bytes (16G) or a fraction of RAM "
                        "(0.8) (default: no limit)")
    p.add_argument("--vram-budget", metavar="SIZE|FRACTION",
                   help="GPU memory the loaded models may take (their offloaded layers and "
                        "KV cache, estimated as /v1/plan does): bytes (8G) or a fraction of "
                        "the GPUs' total memory (0.9; no GPU: exit 2) (default: no limit)")
    p.add_argument("--keep-alive", metavar="DURATION",
                   help="how long a model loaded on demand stays loaded after its last "
                        "request: 5m, 30s, 0 (unload at once) or -1 (forever) (default 5m; "
                        "models named on the command line stay loaded)")
    p.add_argument("--load-timeout", metavar="DURATION",
                   help="how long a request waits for its model to load (default 10m)")
    p.add_argument("--upstream", action="append", dest="upstreams", metavar="NAME=URL",
                   help="serve NAME from another OpenAI-compatible server (vLLM, SGLang, "
                        "llama-server, lmserve) at URL, its OpenAI base (http://host:8000/v1); "
                        "repeatable. With only upstreams, no local model is loaded")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    for option in config.ENGINE_OPTIONS:  # declared once, in lmserve.config
        if option.const is not None:  # a switch: --no-mmap
            p.add_argument(*option.flags, dest=option.key, help=option.help,
                           action="store_const", const=option.const)
            continue
        convert: dict[str, Any] = {} if option.kind is str or option.flag_text \
            else {"type": option.kind}
        p.add_argument(*option.flags, dest=option.key, help=option.help, metavar=option.metavar,
                       choices=option.choices, **convert)
    p.add_argument("--kv-split", action="store_true", default=None,
                   help="the same as --kv-layout split")
    p.add_argument("--lora", action="append", dest="loras", metavar="ALIAS=PATH[:SCALE]",
                   help="load a LoRA adapter GGUF for the first model, served as MODEL:ALIAS "
                        "and by the requests' lora fields (scale default 1); repeatable")
    p.add_argument("--chat-template", help="override template: file (.jinja or "
                                           "tokenizer_config.json) or inline Jinja")
    p.add_argument("--media-allowed-domain", action="append", dest="media_allowed_domains",
                   metavar="HOST", help="host that image URLs may name (*.example.com: its "
                                        "subdomains); repeatable (default: none, URLs refused)")
    p.add_argument("--media-dir", help="directory whose files image paths and file:// URLs may "
                                       "name (default: none, local files refused)")
    p.add_argument("--media-max-bytes", type=int,
                   help="largest image, decoded or downloaded, in bytes (default 20 MiB)")
    p.add_argument("--media-timeout", type=float,
                   help="seconds for one image or audio download (default 10)")
    p.add_argument("--media-max-images", type=int,
                   help="most images and audio clips per request (default 16)")
    p.add_argument("--audio-max-bytes", type=int,
                   help="largest audio clip (WAV or MP3), inline or downloaded, in bytes "
                        "(default 100 MiB)")
    p.add_argument("--api-key", action="append", dest="api_keys",
                   help="require this key (Authorization: Bearer or x-api-key); repeatable")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="keys, one a line: KEY [name=NAME] [rpm=N] [tpm=N] [max_tokens=N] "
                        "[max_prompt_tokens=N] [admin]; reread on SIGHUP")
    p.add_argument("--admin-key", action="append", dest="admin_keys", metavar="KEY",
                   help="a key that may also use the admin routes (/flush_cache, aborting "
                        "another key's request, changing a model's defaults); repeatable")
    p.add_argument("--max-body-bytes", type=ByteSize, metavar="SIZE",
                   help="largest request body, e.g. 8M (default 32M); larger ones get 413")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="most prompt tokens of one request (default: the context)")
    p.add_argument("--max-output-tokens", type=int, metavar="N",
                   help="most max_tokens of one request, and the max_tokens of a request "
                        "that sets none (default: the context)")
    p.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                   help="a browser origin (https://app.example.com, or *) allowed to call the "
                        "API from its pages; repeatable (default: none, CORS off)")
    p.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate "
                                                          "(PEM; may hold the key too)")
    p.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--store", help="where sessions, stored responses and resumable streams "
                                   "live: sqlite:///path.db, memory or redis://host:port/db; "
                                   "none keeps no responses or sessions "
                                   "(default: SQLite under --data-dir)")
    p.add_argument("--data-dir", help="data directory (default ~/.local/share/lmserve)")
    p.add_argument("--stream-ttl", type=float,
                   help="seconds a finished native stream stays readable (default 600)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                   help="after SIGTERM or SIGINT, how long running requests may finish before "
                        "they are ended with an error (default 30); a second signal exits at "
                        "once")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"],
                   help="log lines as text or one JSON object each (default text); every line "
                        "about a request carries its request id, and each request ends with "
                        "one access line")
    p.add_argument("--otel-endpoint", metavar="URL",
                   help="send OpenTelemetry traces over OTLP/HTTP to this collector "
                        "(http://host:4318); the OTEL_EXPORTER_OTLP_ENDPOINT environment "
                        "does the same (default: no traces)")


def serve_config(args: argparse.Namespace) -> config.ServerConfig:
    file_layer = config.load_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    return config.build(file_layer, config.from_env(), flags)


def serve(args: argparse.Namespace) -> int:
    from lmserve.core.quota import TokenLimits
    from lmserve.http import drain
    from lmserve.http.access import AccessSettings
    from lmserve.http.app import StoreSettings, create_app, stream_retention
    from lmserve.http.keys import KeyRing
    from lmserve.http.observe import configure_logging, enable_tracing
    from lmserve.models.registry import ModelRegistry
    from lmserve.models.setup import StartModel
    from lmserve.models.setup import fill as fill_registry

    try:
        cfg = serve_config(args)
    except (ValueError, OSError) as exc:
        print(f"lmserve: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level, cfg.log_format)
    registry = ModelRegistry()
    from lmserve.core.errors import LmserveError
    try:
        library = cfg.library
        models = [resolve(ref) for ref in cfg.models or
                  (() if cfg.upstreams or library.models_dirs or library.discover
                   or cfg.model_sections else (DEFAULT_MODEL,))]
        loras = assign_loras(cfg.engine.loras, [m.name for m in models])
        start = [StartModel(m.name, m.path, replace(cfg.engine, loras=loras[m.name]),
                            tuple(_aliases(m.name, m.path))) for m in models]
        for section, settings in cfg.model_sections:  # [models.NAME] with settings
            path = resolve(section.reference).path
            start.append(StartModel(section.name, path, settings, section.aliases,
                                    section.keep_alive, section.at_start, section.params))
        fill_registry(registry, start, library, cfg.engine)
        check_drafts(registry)  # a draft model with another vocabulary: exit 2
        check_rpc(cfg)  # an RPC server that cannot be reached, or no RPC backend: exit 2
        keys = KeyRing(cfg.api_keys, cfg.admin_keys, cfg.api_key_file)  # a bad line: exit 2
        app = create_app(registry, api_keys=cfg.api_keys, upstreams=cfg.upstreams,
                         store=StoreSettings(url=cfg.store, data_dir=cfg.data_dir,
                                             retention=stream_retention(cfg.stream_ttl)),
                         access=AccessSettings(
                             keys=keys, max_body_bytes=cfg.max_body_bytes,
                             limits=TokenLimits(cfg.max_prompt_tokens, cfg.max_output_tokens),
                             cors_origins=cfg.cors_origins))
    except (LmserveError, ValueError) as exc:
        print(f"lmserve: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    if enable_tracing(app, cfg.otel_endpoint):
        logging.getLogger("lmserve").info("tracing requests: OpenTelemetry over OTLP/HTTP")
    scheme = "https" if cfg.ssl_certfile else "http"
    print(f"lmserve {__version__}: serving {', '.join(s.name for s in registry)} on "
          f"{scheme}://{cfg.host}:{cfg.port} (models load after the port is bound)",
          file=sys.stderr)
    keys.reload_on_sighup()
    return drain.serve(app, registry, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                       drain_timeout=cfg.drain_timeout,
                       writers=lambda: app.state.lmserve.producers.running,
                       options={"ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile,
                                "ws_max_size": cfg.max_body_bytes})


def check_drafts(models: Iterable[Any]) -> None:
    """Refuse, before the port is bound, a --draft model whose vocabulary is not that of a
    model named at start (ValueError naming both). Models a library finds are checked when
    they load (their load fails with the same message)."""
    from lmserve.engine.draft_model import check_files
    from lmserve.models.views import NameView

    for backend in models:
        settings = getattr(backend, "settings", None)
        entry = getattr(backend, "entry", None)  # a model the load manager loads
        path = entry.path if entry is not None else getattr(backend, "path", None)
        if entry is not None and entry.source not in ("cli", "config") or \
                isinstance(backend, NameView):  # its engine's draft, checked under its name
            continue
        if settings is not None and getattr(settings, "draft", None) and path:
            check_files(path, settings.draft, backend.name)


def check_rpc(cfg: config.ServerConfig) -> None:
    """Refuse, before the port is bound, --rpc servers (the server's, or a [models.NAME]
    section's) that cannot be used: a build without the RPC backend, a server that cannot be
    reached, is busy or speaks another protocol (ValueError naming the flag and the server)."""
    endpoints = dict.fromkeys(e for s in (cfg.engine, *(st for _, st in cfg.model_sections))
                              for e in s.rpc)
    if endpoints:
        from lmserve.engine import rpc_server

        rpc_server.check(endpoints)


def rpc_server(args: argparse.Namespace) -> int:
    """`lmserve rpc-server`: serve this host's devices to other hosts' `lmserve serve --rpc`
    through llama.cpp's RPC server, until SIGINT or SIGTERM."""
    from lmserve.engine import rpc_server as server

    return server.serve(args.host, args.port, threads=args.threads, cache_dir=args.cache,
                        device_names=[n.strip() for n in ",".join(args.device or []).split(",")
                                      if n.strip()])


def _rpc_server_arguments(p: argparse.ArgumentParser) -> None:
    from lmserve.engine.rpc import DEFAULT_PORT

    p.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address to listen on (default 127.0.0.1). The server has no "
                        "authentication or encryption: anything else is for a private "
                        "network only")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--threads", "-t", type=int, metavar="N",
                   help="CPU threads of the CPU device (default: all cores)")
    p.add_argument("--cache", metavar="DIR",
                   help="keep the large tensors clients send here, by hash, so a client that "
                        "loads the same model again sends hashes instead of the weights "
                        "(default: off)")
    p.add_argument("--device", "-d", action="append", metavar="NAME[,NAME...]",
                   help="the devices to serve, by ggml name (CUDA0, Vulkan0, CPU, ...); "
                        "repeatable (default: the GPUs, else the CPU)")


def _aliases(name: str, path: str) -> list[str]:
    from pathlib import Path

    file = Path(path)
    return [a for a in dict.fromkeys([file.name, file.stem]) if a != name]


def run(args: argparse.Namespace) -> int:
    """`lmserve run module:app`: serve an App defined in code."""
    from lmserve.app import App, load_app
    from lmserve.app import run as run_app
    from lmserve.http.observe import configure_logging

    configure_logging(args.log_level)
    sys.path.insert(0, ".")
    try:
        app = load_app(args.app)
    except (ImportError, ValueError) as exc:
        print(f"lmserve: cannot load {args.app}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(app, App):
        print(f"lmserve: {args.app} is a {type(app).__name__}, not an lmserve App",
              file=sys.stderr)
        return 2
    run_app(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def bench(args: argparse.Namespace) -> int:
    from lmserve.bench import cli as bench_cli

    return bench_cli.main(args)


def cluster_main(args: argparse.Namespace) -> int:
    from lmserve import cluster

    return cluster.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve models over HTTP")
    _serve_arguments(p_serve)
    p_serve.set_defaults(func=serve)
    p_run = sub.add_parser("run", help="serve an lmserve App defined in code (module:app)")
    p_run.add_argument("app", help="module:attribute of the App, e.g. examples.serving_llms:app")
    p_run.add_argument("--host", default="127.0.0.1")
    p_run.add_argument("--port", type=int, default=8000)
    p_run.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    p_run.set_defaults(func=run)
    p_bench = sub.add_parser("bench", help="load-test an OpenAI-compatible server or the engine")
    from lmserve.bench import cli as bench_cli
    from lmserve.bench import inprocess
    bench_cli.add_arguments(p_bench)
    inprocess.add_arguments(p_bench)
    bench_cli.register_backend("inprocess", inprocess.factory)
    p_bench.set_defaults(func=bench)
    p_cluster = sub.add_parser("cluster", help="a local cluster: redis-server, N replicas and "
                               "sglang-router in front (development and tests)")
    cluster_arguments(p_cluster)
    p_cluster.set_defaults(func=cluster_main)
    p_rpc = sub.add_parser("rpc-server", help="serve this host's CPU or GPUs to other hosts' "
                           "`lmserve serve --rpc` (llama.cpp's RPC backend, experimental)")
    _rpc_server_arguments(p_rpc)
    p_rpc.set_defaults(func=rpc_server)
    return parser


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
