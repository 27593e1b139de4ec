# Two commands for a newcomer: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
ZENML_VENV := .venv-zenml
ZENML_VERSION := 0.98.0

.PHONY: demo test bench crds clean

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

demo: $(VENV)/.installed $(ZENML_VENV)/.installed
	$(VENV)/bin/zenml-operator demo

test: $(VENV)/.installed $(ZENML_VENV)/.installed
	$(VENV)/bin/ruff check operator tests
	$(VENV)/bin/ruff format --check operator tests
	$(VENV)/bin/python -m pytest

crds: $(VENV)/.installed
	$(VENV)/bin/zenml-operator crds
	$(VENV)/bin/zenml-operator crds --output charts/zenml-operator/crds

clean:
	rm -rf $(VENV) $(ZENML_VENV) .zenml-demo .pytest_cache

# Not part of `make test`: prints figures (see tests/bench/README.md).
bench: $(VENV)/.installed $(ZENML_VENV)/.installed
	$(VENV)/bin/python tests/bench/benchmark.py
