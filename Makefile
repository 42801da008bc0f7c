# Two commands do all the set-up on a fresh Debian/Ubuntu x86_64 machine with Python 3.11+:
#   make run    the whole system locally (Redis, MongoDB, one worker, one gateway)
#   make test   the test suite on real Redis and MongoDB
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install run test lint format scale-test up down clean

$(STAMP): pyproject.toml
	@bash deploy/local/bootstrap.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python -m deploy.local.run

test: install
	$(BIN)/python -m deploy.local.prepare
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# make scale-test [PEERS=1] [ARGS="--workload rooms --duration 30"]
scale-test: install
	$(BIN)/python -m tests.scale.harness $(if $(PEERS),--peers) $(ARGS)

COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
up:
	$(COMPOSE) up --build -d
down:
	$(COMPOSE) down

clean:
	rm -rf .var reports test-artifacts .pytest_cache .mypy_cache .ruff_cache
