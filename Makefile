# Two commands matter: `make demo` and `make test`. Both create .venv first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/kiln demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench $(BENCH)

lint: setup
	$(BIN)/ruff check pipeline data_prep tests bench

clean:
	rm -rf $(VENV) demo_out runs mlflow.db
