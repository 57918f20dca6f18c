# The two commands of the README. Each sets up everything it needs on a machine with only
# python3 and make: a virtual environment in .venv, the package, and (for tests) its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The main job: the default experiment end to end on embedded data (train with periodic
# evaluation and checkpoints, calibrate its exits, then evaluate the last checkpoint at full
# depth and with the exits). The runlocal variant
# fits 2 CPU cores (~2 min); `make run CONFIG=experiments/configs/multitask.py` is the full one.
CONFIG ?= experiments/configs/multitask.py:runlocal
WORKDIR ?= workdirs/multitask
run: $(VENV)/.installed
	$(BIN)/python -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(BIN)/python -m tools.calibrate_exits --workdir=$(WORKDIR) --skip_without_exits
	$(BIN)/python -m experiments.evaluate --workdir=$(WORKDIR)

# The benchmarks: MoE layer against dense and the one-hot reference; inference by buckets.
bench: $(VENV)/.installed
	$(BIN)/python -m tools.benchmark_moe --output=results/benchmark_moe.json
	$(BIN)/python -m tools.benchmark_inference --output=results/benchmark_inference.json

# The whole test suite, on CPU, two worker processes.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
