# Two commands for a newcomer: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
ZENML_VENV := .venv-zenml
ZENML_VERSION := 0.98.0

.PHONY: demo test bench crds clean kube-assets

# The real-apiserver tier (tests/realkube) and `make bench` use a real control plane from
# KUBEBUILDER_ASSETS (the envtest convention). When it is unset and ../shared/kube is beside
# the clone (with etcd installed), it is unpacked into .kube-assets; otherwise the tier is
# skipped with a line saying how to get the binaries.
SHARED_KUBE := ../shared/kube
ifeq ($(origin KUBEBUILDER_ASSETS), undefined)
ifneq ($(wildcard $(SHARED_KUBE)/unpack.sh),)
KUBE_ASSETS_DIR := $(CURDIR)/.kube-assets
export KUBEBUILDER_ASSETS := $(KUBE_ASSETS_DIR)
endif
endif

kube-assets:
ifneq ($(KUBE_ASSETS_DIR),)
	@bash $(SHARED_KUBE)/unpack.sh $(KUBE_ASSETS_DIR) >/dev/null
endif

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

# zenml[server] pins many packages (pydantic, fastapi, click...): it gets its own
# environment so that the operator's dependencies stay small and unconstrained.
$(ZENML_VENV)/.installed:
	$(PYTHON) -m venv $(ZENML_VENV)
	$(ZENML_VENV)/bin/pip install -q --upgrade pip
	$(ZENML_VENV)/bin/pip install -q "zenml[server]==$(ZENML_VERSION)"
	touch $@

# The demo lives in operator/zenml_devstack (not in the operator's wheel or image); the
# editable install puts operator/ on sys.path. Options: make demo DEMO_ARGS="--keep-running -v"
DEMO_ARGS ?=
demo: $(VENV)/.installed $(ZENML_VENV)/.installed
	$(VENV)/bin/python -m zenml_devstack.demo $(DEMO_ARGS)

test: $(VENV)/.installed $(ZENML_VENV)/.installed kube-assets
	$(VENV)/bin/ruff check operator tests
	$(VENV)/bin/ruff format --check operator tests
	$(VENV)/bin/python -m pytest

crds: $(VENV)/.installed
	$(VENV)/bin/zenml-operator crds
	$(VENV)/bin/zenml-operator crds --output charts/zenml-operator/crds

clean:
	rm -rf $(VENV) $(ZENML_VENV) .zenml-demo .pytest_cache .kube-assets

# Not part of `make test`: prints figures (see tests/bench/README.md).
bench: $(VENV)/.installed $(ZENML_VENV)/.installed kube-assets
	$(VENV)/bin/python tests/bench/benchmark.py
