# Two commands do all the set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.yaml

.PHONY: run test bench observe check-config clean

# Debian's python3 lacks ensurepip until python3-venv is installed; install it when we can.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: $(VENV)/.runtime
	$(BIN)/gateway serve --config $(CONFIG)

check-config: $(VENV)/.runtime
	$(BIN)/gateway check-config $(CONFIG)

test: $(VENV)/.test
	$(BIN)/pytest --cov=gateway --cov-report=term-missing:skip-covered

# gateway vs direct on a mock upstream, ~3.5 min; BENCH_ARGS=--quick for a smoke run (~20 s)
bench: $(VENV)/.runtime
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# the observability proofs, verbose: a real Prometheus over 2 replicas (one with 2 workers) on a real
# Redis answering the dashboard's queries, and OTLP traces decoded as a collector would (~1 min)
observe: $(VENV)/.test
	$(BIN)/pytest -v tests/e2e/test_metrics_prometheus.py tests/e2e/test_tracing.py tests/e2e/test_metrics_workers.py

clean:
	rm -rf $(VENV) .pytest_cache .coverage
