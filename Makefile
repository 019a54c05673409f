# Two commands a new user needs (see README):  make run   and   make test
# The first use of either creates .venv from the pinned lock file (a few minutes, ~6.5 GB).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv

$(STAMP): requirements.lock.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Main job: the pipeline flow (Prefect, in-process) on the bundled MVTec AD bottle data: download ->
# version data (DVC) -> prepare -> train -> evaluate -> track + register a champion (MLflow) -> report.
run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/anomaly run --params params.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/metrics.py

clean-venv:
	rm -rf $(VENV)
