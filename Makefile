# The README's two commands: `make quickstart` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test quickstart test lint

# torch==2.13.0 only when no torch is importable: a GPU user's CUDA build is left alone.
# With the quickstart extras: sentencepiece, tensorboard, safetensors (see setup.py).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[quickstart]"

install-test:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"

quickstart: install
	bash examples/quickstart.sh

# Static checks, in order: lint, formatting, the package layering (import-linter's contracts,
# [tool.importlinter] in pyproject.toml) and types (mypy on engine/ and kernels/, [tool.mypy]).
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports
	$(PYTHON) -m mypy

# Prerequisites run left to right: install, the static checks, then the tests.
test: install-test lint
	$(PYTHON) -m pytest
