# Two commands on a fresh machine: `make demo` (the pipeline on the demo data) and
# `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export WHALE_HOME ?= $(CURDIR)/whale_home
export DAGSTER_HOME ?= $(WHALE_HOME)/dagster_home
export MLFLOW_DISABLE_TELEMETRY := true
export DAGSTER_DISABLE_TELEMETRY := 1
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0
RECIPE ?= configs/demo.yaml

.PHONY: venv demo test test-fast ui clean-home browser

# One pip command with exact pins (requirements/constraints.txt, a full freeze of a
# working environment): installing packages separately lets pip downgrade dagster.
# A fresh .venv holds about 7.4 GB (CUDA-enabled PyTorch and its libraries; 7.8 GB at the
# peak of a first `make test`, measured in a fresh clone): check the
# disk first, so that a full disk is a clear message rather than pip's OSError halfway
# through. --no-cache-dir: a cache would keep a second copy of the GBs of wheels. The
# interpreter is checked first too: the pins need Python 3.11+, and pip's own error does not say so.
VENV_MIN_FREE_GB ?= 8
$(BIN)/.installed: pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) scripts/check_python.py
	@test -x $(BIN)/python || $(PYTHON) scripts/check_disk.py "$(VENV)" $(VENV_MIN_FREE_GB)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check --no-cache-dir \
		-c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
	@touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/whale run --recipe $(RECIPE)

# tests/test_servers.py opens the Dagster UI in headless Chromium: installed from Debian
# packages when apt-get can (as root, e.g. in CI); otherwise that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: no Chromium and no root apt-get: the browser test will be skipped"

test: venv browser
	$(BIN)/python -m pytest -q --durations=30

# The edit-test loop: everything but the end-to-end, server, fault-injection and slow tests
# (their marks: pyproject.toml). CI runs `make test`.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not e2e and not server and not kill and not slow"

ui: venv
	scripts/ui.sh

clean-home:
	rm -rf "$(WHALE_HOME)"
