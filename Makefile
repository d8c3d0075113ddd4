# The interpreter: the distribution's python3 when it is 3.11 or newer and can make a venv
# (python3-venv), else the first python3 on PATH; PY=... overrides. Debian's is built with PGO
# and LTO, libpython linked into the executable: mailgate needs ~10-18% less CPU
# per submission on it than on a --enable-shared source build such as pyenv's default
# (benchmarks/README.md, seventh session).
SYSTEM_PY := /usr/bin/python3
PY ?= $(shell $(SYSTEM_PY) -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' \
	>/dev/null 2>&1 && echo $(SYSTEM_PY) || echo python3)
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
