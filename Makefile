# Orchard: `make run` serves the embedded model, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run run-distributed test test-fast setup openblas model bench clean

$(BIN)/orchard: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

setup: $(BIN)/orchard openblas

# Linux: MLX's CPU wheel bundles a slow reference BLAS; install Debian's OpenBLAS where we can
# (root or passwordless sudo), else say how. Never fails; a no-op once it is there or on macOS.
openblas: $(BIN)/orchard
	@scripts/install-openblas.sh $(BIN)/python

model: setup
	$(BIN)/orchard model prepare

run: model
	$(BIN)/orchard serve

# One model across two local processes (a loopback ring; rank 0 serves HTTP on PORT).
run-distributed: model
	$(BIN)/orchard serve --ranks 2

test: model
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fast tier: no server, no model; seconds. `make test` stays the whole suite.
test-fast: setup
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

bench: model
	$(BIN)/orchard bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
