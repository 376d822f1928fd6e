# Two entry points (see README): `make demo` trains on the built-in digits,
# `make test` runs the whole suite. Both create or reuse .venv/ in the repo root.
# `make docs` builds the docs site into build/site (mkdocs, strict; the dits[docs] extra).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dits-installed
DOCS_STAMP := $(VENV)/.dits-docs-installed

.PHONY: demo test setup docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on a CPU-only machine this is the CPU build. CUDA users:
	# install your own torch into .venv before running make (any torch >= 2.1);
	# a torch that is already there is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dits train --preset digits --out runs/digits --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs
