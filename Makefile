# Two commands on a fresh machine: `make demo` (the main job) and `make test` (lint, the type check, the test suite).
# Each sets up what it needs on first use: .venv with the pinned PyTorch, metapl (editable) and its extras.
# People who manage their own environment run the pip line of `$(VENV)/.installed` themselves (README.md).

PYTHON ?= python3
VENV ?= .venv
TORCH_PINS = torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint typecheck setup

setup: $(VENV)/.installed

# Re-installed when pyproject.toml changes (new dependencies or extras).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PINS) -e ".[dev]"
	@touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/metapl demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# mypy on src/ ([tool.mypy] in pyproject.toml): every function annotated, every call checked.
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest
