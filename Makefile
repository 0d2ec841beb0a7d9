# Two commands matter: `make demo` and `make test`. Both create .venv first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
# GPTQModel (+ optimum): the CPU GPTQ loader transformers uses, for the test that loads Kiln's GPTQ export.
# It declares torch>=2.14.1 but runs on the pinned 2.13 CPU build, so it goes in without its dependency
# list (everything it imports is already there).
GPTQ_LOADER := gptqmodel optimum pypcre tokenicer logbar device-smi defuser

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,eval]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt $(GPTQ_LOADER)
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
