# hetmoe: two commands matter on a fresh machine, `make run` and `make test`.
# Everything they need is installed on demand: a bootstrap uv, the project venv
# (.venv, from requirements.lock), and the Go-built Kubernetes control plane
# (cached outside the repo under $(HETMOE_CACHE), keyed by our go.sum).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

HETMOE_CACHE ?= $(HOME)/.cache/hetmoe
export HETMOE_CACHE
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
UV := $(HETMOE_CACHE)/bootstrap/bin/uv
PURE_CORE := operator/hetmoe_operator/api operator/hetmoe_operator/plan.py \
	operator/hetmoe_operator/placement operator/hetmoe_operator/desired \
	operator/hetmoe_operator/reconcile operator/hetmoe_operator/errors.py

.PHONY: help run test lint venv cluster-bin prometheus cluster-up cluster-down crd plan clean

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(UV):
	python3 -m venv $(HETMOE_CACHE)/bootstrap
	$(HETMOE_CACHE)/bootstrap/bin/pip install --quiet uv==$(UV_VERSION)

venv: $(VENV)/.synced ## Create .venv and sync it to requirements.lock (a no-op when in sync)

# A stamp, not a sync on every call: `uv pip sync` removes the editable hetmoe before
# reinstalling it, which would break tests already running from the same venv (say a
# `make lint` next to a long pytest run).
$(VENV)/.synced: requirements.lock pyproject.toml | $(UV)
	[ -x $(PY) ] || $(UV) venv --quiet --python python3.11 $(VENV)
	$(UV) pip sync --quiet --python $(PY) requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $@

cluster-bin: ## Build (once) etcd, kube-apiserver, controller-manager, scheduler, kwok, helm
	bash tests/cluster/build.sh >/dev/null

prometheus: ## Install a real Prometheus (Debian package) for the observability test
	bash tests/local/install_prometheus.sh

lint: venv ## ruff, mypy on the pure core, import-linter contracts
	$(VENV)/bin/ruff check operator trainer tests bench
	$(VENV)/bin/ruff format --check operator trainer tests bench
	$(VENV)/bin/mypy $(PURE_CORE)
	$(VENV)/bin/lint-imports

test: venv cluster-bin prometheus lint ## Lint and every test, unit and integration (real control plane)
	rc=0; $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: the suite layout is broken" >&2; fi; \
	exit $$rc

run: venv ## The main job, locally: plan the tiny MoEJob over two simulated pools and train it
	$(VENV)/bin/hetmoe run -f examples/moejob-tiny.yaml --cluster examples/clusters/local.yaml

plan: venv ## Plan Ling-Plus over 10^12 tokens on the reference 5-grade mix (cost vs premium-only)
	$(VENV)/bin/hetmoe plan -f examples/moejob-ling-plus.yaml --cluster examples/clusters/reference-mix.yaml

cluster-up: venv cluster-bin ## Start a dev control plane with fake node pools; prints the KUBECONFIG line
	$(PY) -m tests.cluster up --topology $(or $(TOPOLOGY),tests/topologies/small-mixed.yaml)

cluster-down: venv ## Stop the dev control plane started by cluster-up
	$(PY) -m tests.cluster down

crd: venv ## Regenerate crds/moejob.yaml from the API models
	$(VENV)/bin/hetmoe crd > crds/moejob.yaml

clean: ## Remove the venv and caches inside the repo (never the control-plane cache)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
