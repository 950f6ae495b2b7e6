# CarePost: the two commands.
#
#   make run    create .venv, install, initialize the data dir (prints the one-time setup link
#               on first start) and run everything on this machine (server, worker, mail capture)
#   make test   install the test extras and run the whole suite
#
# Needs only Python 3.11+, make and the Debian packages in README.md (`make test-deps`).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two xdist workers: about twice as fast as one process on two cores (docs/development.md).
PYTEST_WORKERS ?= 2
# Whole files to a worker: a UI module starts its server and browser once, not on both workers;
# files with slow tests are dealt out first (tests/conftest.py).
PYTEST_DIST ?= loadfile
PYTEST_ARGS ?=

# Debian packages: Chromium for the UI tests (Playwright drives the system browser), gpg and
# openssl to prove PGP and S/MIME output decrypts, PostgreSQL and Redis for the scale-out backends,
# nginx for the multi-node topology test.
DEBIAN_TEST_PACKAGES := chromium gnupg openssl postgresql redis-server unbound nsd ldnsutils nginx-light

.PHONY: help run test test-deps install clean-venv

help:
	@echo "make run        install and start CarePost on http://localhost:8000"
	@echo "make test       install test extras and run the whole test suite"
	@echo "make test-deps  install the Debian packages the tests need (root or sudo)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/carepost init
	$(BIN)/carepost run

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist $(PYTEST_DIST) $(PYTEST_ARGS)

test-deps:
	@missing=""; for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "Debian test packages present."; exit 0; fi; \
	SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	echo "Installing:$$missing"; \
	$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $$missing

clean-venv:
	rm -rf $(VENV)
