# Two entry points: `make demo` (the extender scheduling GPU pods through a real kube-scheduler) and `make test`.
# Both install what they need first, into the project's own virtual environment (.venv), never the machine's
# Python; the Kubernetes binaries are built once from Go modules and cached.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test lint bench fuzz

setup:
	@VENV=$(VENV) bash e2e/setup.sh

demo: setup
	$(PYTHON) -m e2e.demo

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PYTHON) -m e2e.bench_extender

# Every verb under 10,000 malformed and odd requests (e2e/fuzz_verbs.py); prints cases per verb and status codes.
fuzz: setup
	$(PYTHON) -m e2e.fuzz_verbs --cases 10000
