# `make train` and `make test` are the two commands a new user runs; each sets up what it needs first.
PYTHON ?= python3.11
VENV := .venv
SPEC ?= examples/default.yaml
PYTEST_ARGS ?=
# The local output folder, and the runs `make compare` compares (default: every run in it).
OUTPUT ?= runs
RUNS ?= $(wildcard $(OUTPUT)/*/config.json)

.PHONY: train test status compare clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# A stamp per requirements file: a second `make train` installs nothing unless the pins changed.
$(VENV)/.runtime: $(VENV)/bin/python requirements.txt pyproject.toml
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

train: $(VENV)/.runtime
	$(VENV)/bin/python -m job run --spec $(SPEC)

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

status: $(VENV)/.runtime
	$(VENV)/bin/python -m job status $(OUTPUT)

compare: $(VENV)/.runtime
	$(VENV)/bin/python -m job compare $(patsubst %/config.json,%,$(RUNS)) --out $(OUTPUT)

clean-venv:
	rm -rf $(VENV)
