# The two commands the README promises: `make test` and `make demo`, on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
LINTED := stillroom tests benchmarks examples

.PHONY: install test test-slow demo lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: lint
	$(BIN)/python -m pytest -q

# Part of `make test` (and so of CI): lint and formatting are checked, not only offered.
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# Long runs kept out of `make test` (minutes each): `@pytest.mark.slow`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/stillroom demo

clean:
	rm -rf $(VENV) build *.egg-info
