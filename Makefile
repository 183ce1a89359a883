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

# The tests that mostly wait (Flower SuperLink/SuperNode polling and heartbeats, a Prefect server
# starting, a DICOM receiver's quiet period, pip installing from a wheelhouse) run beside the rest
# of the suite, with the export tests to fill that waiting; their report follows. Their temporary
# folders (several GB of site workspaces) are removed afterwards. --durations shows where CI time goes.
FED_TESTS := tests/test_fed_deploy.py tests/test_export.py tests/test_receive.py tests/test_scheduled.py \
             tests/test_airgap.py
test: install
	@fedlog=$$(mktemp); fedtmp=$$(mktemp -d -u /tmp/rfm-fed-tests-XXXXXX); \
	$(BIN)/python -m pytest $(FED_TESTS) --basetemp=$$fedtmp -p no:cacheprovider --durations=15 > $$fedlog 2>&1 & fed=$$!; \
	$(BIN)/python -m pytest $(addprefix --ignore=,$(FED_TESTS)) --durations=30; rest=$$?; \
	wait $$fed; fedrc=$$?; echo "---- $(FED_TESTS) (run alongside) ----"; cat $$fedlog; rm -rf $$fedlog $$fedtmp; \
	test $$rest -eq 0 -a $$fedrc -eq 0

bench: install
	$(BIN)/rfm bench ingest $(if $(wildcard $(REAL_GE)),--real $(REAL_GE))

clean:
	rm -rf $(VENV) demo *.egg-info .pytest_cache
