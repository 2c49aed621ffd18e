# The verbs a user types. The environment is made on first use and refreshed when the
# project's dependencies change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench lint install install-test clean compose-up deploy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[router,piper]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[router,piper,test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Listens on 127.0.0.1:8080; HOST and PORT in the environment override it.
run: install
	$(BIN)/chorus serve

test: install-test
	$(BIN)/pytest

bench: install-test
	$(BIN)/python bench/speech.py

lint: install-test
	$(BIN)/ruff check .

# Needs a Docker engine with the compose plugin; COMPOSE_PROFILES=gpu adds the GPU backends.
compose-up:
	docker compose -f infra/compose.yaml up --build

# Needs a Modal token (`modal token new`); see "Deploy on Modal" in the README.
deploy: install
	$(BIN)/pip install --quiet -e '.[modal]'
	$(BIN)/modal deploy infra/modal_app.py

clean:
	rm -rf $(VENV)
