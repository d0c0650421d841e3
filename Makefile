# Sensormine Edge — development entry points. `make test` and `make demo` set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup services test test-slow lint demo bench clean config-reference

setup: $(STAMP) services $(BIN)/promtool

# Everything for development: the agent (the core), the collector extra and the dev tools.
# Reinstall only when the project's metadata changes: a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[collector,dev]'
	touch $(STAMP)

services:
	scripts/setup-services

# promtool checks config/prometheus/ in the test suite (extracted from Debian's package).
$(BIN)/promtool: $(STAMP)
	scripts/setup-promtool $(BIN)/promtool

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -m "not slow"

test-slow: setup
	$(BIN)/pytest -m slow

# Regenerate docs/configuration.md after changing a settings model or an example file.
config-reference: $(STAMP)
	$(BIN)/python scripts/config_reference.py

# The end-to-end demo: a collector and two agents with simulated sensors for DEMO_SECONDS (30),
# and the status page meanwhile (its URL and a token are printed); DEMO_SCREENSHOT=<file.png>
# saves the fleet page there and a device page beside it (<file>-device.png).
DEMO_SECONDS ?= 30
DEMO_SCREENSHOT ?=
demo: setup
	DEMO_SECONDS=$(DEMO_SECONDS) DEMO_SCREENSHOT=$(DEMO_SCREENSHOT) $(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python bench/wire.py
	$(BIN)/python bench/agent_buffer.py
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/agent_install_size.py
	$(BIN)/python bench/collector_ingest.py
	$(BIN)/python bench/lifecycle_rollups.py
	$(BIN)/python bench/storage.py
	$(BIN)/python bench/inputs.py
	$(BIN)/python bench/alerts.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Offline installation bundle of the agent for this machine's Python and architecture
# (dist/sensormine-agent-<version>-<python tag>-<arch>.tar.gz); see docs/install-agent.md.
.PHONY: bundle
bundle:
	scripts/build-bundle --python $(PYTHON)
