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

# The main job: the MoE layer benchmark against the dense FFN and the one-hot reference.
run: $(VENV)/.installed
	$(BIN)/python -m tools.benchmark_moe --output=results/benchmark_moe.json

# The whole test suite, on CPU, two worker processes.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
