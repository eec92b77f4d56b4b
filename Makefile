# Every target installs what it needs into $(VENV) first, so each works on a fresh machine.
# The pinned torch is installed before the project so that pip keeps it (an unpinned torch pulls a CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv install test test-all lint demo bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"

venv: $(PY)

install: venv
	$(PY) -m pip install -q -e ".[test,examples]"

lint: install
	$(PY) -m ruff check .

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

demo: install
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
