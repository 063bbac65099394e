# Two entry points: `make demo` (the extender scheduling GPU pods through a real kube-scheduler) and `make test`.
# Both install what they need first; the Kubernetes binaries are built once from Go modules and cached.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test lint bench

setup:
	@bash e2e/setup.sh

demo: setup
	$(PYTHON) -m e2e.demo

test: setup
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .

bench: setup
	$(PYTHON) -m e2e.bench_extender
