# One command each: `make demo` and `make test` create or refresh .venv, install, and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
REAL_GE := ../shared/data/real/dcm_qa_ct_GE

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --progress-bar off --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --progress-bar off -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/rfm demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/rfm bench ingest $(if $(wildcard $(REAL_GE)),--real $(REAL_GE))

clean:
	rm -rf $(VENV) demo *.egg-info .pytest_cache
