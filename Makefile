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

.PHONY: help venv prometheus-tools test lint demo bench simulate crds dashboards dashboard-picture check e2e e2e-kind clean

help: ## show this help
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with the project and its test tools

# tests/monitoring run Debian's promtool and prometheus (package `prometheus`); installed here, outside the
# tests' timeouts, when missing and root (as in CI). Without root the tests skip with this hint (not under CI).
prometheus-tools: ## install Debian's prometheus package (promtool) for tests/monitoring when missing
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }; \
	else echo "tests/monitoring need promtool and prometheus: apt-get install -y --no-install-recommends prometheus"; fi

test: $(STAMP) prometheus-tools ## run every test (sidecar, operator, CRDs, chart, lint)
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

dashboards: $(STAMP) ## regenerate the chart's Grafana dashboard from llmroute_operator.dashboardgen
	$(PY) -m llmroute_operator.dashboardgen

dashboard-picture: $(STAMP) ## docs/dashboard.png: the dashboard's queries answered by a real Prometheus during the demo
	LLMROUTE_DASHBOARD_PNG=docs/dashboard.png $(PY) -m pytest tests/monitoring/test_prometheus_e2e.py -q

check: $(STAMP) ## fail when generated files drifted from their source
	$(PY) -m llmroute_operator.crdgen --check
	$(PY) -m llmroute_operator.dashboardgen --check

e2e: $(STAMP) ## operator, chart and webhook against a real kube-apiserver (builds it with Go once; see README)
	bash tests/e2e/apiserver/build.sh >/dev/null
	$(PY) -m pytest -m e2e tests/e2e --timeout 300 $(PYTEST_ARGS)

e2e-kind: $(STAMP) ## end-to-end on a kind cluster (needs docker and kind; see README)
	bash tests/e2e/kind.sh

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache demo-report bench-report
