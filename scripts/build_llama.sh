#!/usr/bin/env bash
# Build (once) and install the pinned llama-cpp-python into the given Python.
#
# The wheel is built from source with GGML_NATIVE=OFF and the CPU extensions this machine
# reports (scripts/cpu_cmake_args.py), AMX always off: a native build enables AMX kernels
# on CPUs that advertise AMX, and some VMs advertise AMX but fault on the first AMX
# instruction; a fixed flag list faults on CPUs that lack one of its extensions.
# pip's wheel cache does not key on CMAKE_ARGS, so we build with --no-cache-dir
# into our own cache directory whose name is a hash of version + flags.
# LMSERVE_CMAKE_ARGS adds flags after those (e.g. -DGGML_CUDA=ON for a CUDA build, which keeps
# the safe CPU flags for the layers left on the CPU); CMake takes the last -D of a name, so it
# can also turn a detected flag off (-DGGML_RPC=OFF drops the RPC backend). On macOS the CPU list is empty and Metal stays on.
set -euo pipefail
PY="${1:?usage: build_llama.sh PYTHON}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ARGS="$("$PY" "$HERE/cpu_cmake_args.py")"
# llama.cpp's RPC backend (ggml-rpc): `--rpc host:port` puts layers on other hosts' devices and
# `lmserve rpc-server` serves this host's; it is one small source file and links nothing new.
ARGS="$ARGS -DGGML_RPC=ON"
if [ -n "${LMSERVE_CMAKE_ARGS:-}" ]; then ARGS="$ARGS $LMSERVE_CMAKE_ARGS"; fi
KEY=$(printf '%s|%s|%s' "$VERSION" "$ARGS" "$("$PY" -c 'import sys;print(sys.implementation.cache_tag)')" | sha256sum | cut -c1-16)
CACHE="${LMSERVE_WHEEL_CACHE:-$HOME/.cache/lmserve/wheels}/$KEY"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('llama_cpp_python')=='$VERSION' else 1)" 2>/dev/null \
   && [ -f "$("$PY" -c 'import sys;print(sys.prefix)')/.llama-build-key" ] \
   && [ "$(cat "$("$PY" -c 'import sys;print(sys.prefix)')/.llama-build-key")" = "$KEY" ]; then
  exit 0
fi
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo ">> building llama-cpp-python $VERSION from source (a few minutes); flags: $ARGS"
  mkdir -p "$CACHE.tmp"
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$CACHE.tmp"
  rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
fi
"$PY" -m pip install --no-deps --force-reinstall "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
echo "$KEY" > "$("$PY" -c 'import sys;print(sys.prefix)')/.llama-build-key"
