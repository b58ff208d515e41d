# Everything runs inside ./.venv, created and filled on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-slow lint bench clean

# shards/_packer.c: the converter's C loop, compiled by the project's install (rebuilt when it changes)
$(BIN)/clusterssl: pyproject.toml shards/_packer.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision first, pinned: on the CPU machines this project targets they install from the
	# local wheel store; the project's own requirement (torch>=2.4) is then already satisfied.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/clusterssl

demo: venv
	$(BIN)/clusterssl demo

test: venv
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data mlruns mlflow.db
