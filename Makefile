# Two commands: `make demo` and `make test`. Both create .venv when missing and are fast when it exists.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sleepbot-installed

.PHONY: demo test lint setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is installed first, pinned, so that the package's `torch>=2.3` keeps it (an unpinned torch pulls CUDA).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sleepbot demo

lint: $(STAMP)
	$(BIN)/ruff check sleepbot tests scripts
	$(BIN)/ruff format --check sleepbot tests scripts

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
