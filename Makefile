# Two entry points, each doing its own setup (see README):
#   make demo   profile -> plan (-> fit) an example model on real text
#   make test   the test suite (what CI runs)
# and, for development, make quick: the tests not marked slow (about 3 minutes on 2 cores).
# The venv sees system site-packages so that a machine that already carries torch
# (the GPU images ship torch 2.11) keeps it; elsewhere the local CPU wheel is installed
# first, because an unpinned torch would pull gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $@

.PHONY: setup test quick demo
setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

quick: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: $(VENV)/.installed
	$(PY) examples/gpt_text.py
