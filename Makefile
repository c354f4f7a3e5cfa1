# The two commands the README promises: `make test` and `make demo`, on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/stillroom demo

lint: $(STAMP)
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check stillroom tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
