# llmroute — `make help` lists the targets. Every target installs what it needs first.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_ARGS ?=
SIMULATE_ARGS ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

.PHONY: help venv test lint demo bench simulate crds check e2e e2e-kind clean

help: ## show this help
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with the project and its test tools

test: $(STAMP) ## run every test (sidecar, operator, CRDs, chart, lint)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy --strict
	$(VENV)/bin/ruff check operator sidecar tests bench
	$(VENV)/bin/mypy

demo: $(STAMP) ## the main job: fake providers, the real sidecar, failover you can watch
	$(VENV)/bin/llmroute demo $(DEMO_ARGS)

simulate: $(STAMP) ## compare failover strategies on a scenario
	$(VENV)/bin/llmroute simulate $(SIMULATE_ARGS)

bench: $(STAMP) ## sidecar overhead vs a bare pass-through proxy (latency, throughput, RSS)
	$(PY) bench/bench.py $(BENCH_ARGS)

crds: $(STAMP) ## regenerate the CRD from the policy model
	$(PY) -m llmroute_operator.crdgen

check: $(STAMP) ## fail when generated files drifted from their source
	$(PY) -m llmroute_operator.crdgen --check

e2e: $(STAMP) ## operator, chart and webhook against a real kube-apiserver (builds it with Go once; see README)
	bash tests/e2e/apiserver/build.sh >/dev/null
	$(PY) -m pytest -m e2e tests/e2e --timeout 300 $(PYTEST_ARGS)

e2e-kind: $(STAMP) ## end-to-end on a kind cluster (needs docker and kind; see README)
	bash tests/e2e/kind.sh

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache demo-report bench-report
