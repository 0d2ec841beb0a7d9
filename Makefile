# Two commands matter: `make demo` and `make test`. Both create .venv first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
# GPTQModel (+ optimum): the CPU GPTQ loader transformers uses, for the test that loads Kiln's GPTQ export.
# It declares torch>=2.14.1 but runs on the pinned 2.13 CPU build, so it goes in without its dependency
# list (everything it imports is already there).
GPTQ_LOADER := gptqmodel optimum pypcre tokenicer logbar device-smi defuser

.PHONY: setup demo test bench bench-ttq bench-gpu gpu-wheels lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,eval,sft]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt $(GPTQ_LOADER)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/kiln demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench $(BENCH)

# time to quality vs nanoGPT (docs/benchmarks.md); e.g. make bench-ttq BENCH="--steps 1500 --data DIR"
bench-ttq: setup
	$(BIN)/python -m bench time_to_quality $(BENCH)

# The GPU benchmark's two halves: wheels for what a bare CUDA image lacks, built on a machine with network
# (into .gpu-wheels/), then on the GPU machine one command that installs them offline and measures.
gpu-wheels: setup
	$(BIN)/python -m bench.gpu_wheels .gpu-wheels

# bench-gpu uses the machine's own Python (torch comes with the image); on CPU: make bench-gpu GPU_PY=.venv/bin/python BENCH=--dry-run
GPU_PY ?= python3
bench-gpu:
	$(GPU_PY) -m bench gpu $(BENCH)

lint: setup
	$(BIN)/ruff check pipeline data_prep tests bench

clean:
	rm -rf $(VENV) demo_out runs mlflow.db
