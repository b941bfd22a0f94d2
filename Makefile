# Quick start: `make demo` and `make test` bootstrap .venv themselves from python3 alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,parity,plot,tensorboard,rewards,gguf
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test test-all lint format bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mojax demo

# One worker process per core (pytest-xdist); a test file stays on one worker, so its module fixtures are built once.
# A worker that crashes ends the run, naming its test (pytest-xdist restarts it otherwise, which can hang under
# --dist loadfile).
PYTEST_WORKERS ?= auto

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile --max-worker-restart=0

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --max-worker-restart=0

bench: $(STAMP)
	$(PY) benchmarks/combiners.py
	$(PY) benchmarks/model.py
	$(PY) benchmarks/plan_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
