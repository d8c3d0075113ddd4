PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat

run: install
	$(BIN)/twistd -n mailgate

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache _trial_temp

.PHONY: bench bench-quick bench-install

# Benchmarks: mailgate side by side with Dovecot/Postfix when installed (see benchmarks/README.md).
bench-install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]' --config-settings editable_mode=compat

bench: bench-install
	$(BIN)/python -m benchmarks.run

bench-quick: bench-install
	$(BIN)/python -m benchmarks.run --quick
