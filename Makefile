# Two commands do all set-up on a fresh machine:
#   make serve   create .venv, install, serve all three models
#   make test    create .venv, install with test tools, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SERVE_ARGS ?=
# `make serve` listens on this machine only; SERVE_HOST=0.0.0.0 opens it to the network
# (vision-serve's own --host default is 0.0.0.0, for containers).
SERVE_HOST ?= 127.0.0.1

.PHONY: install install-test serve test fuzz protos screenshots bench lint clean image-test kserve-venv

include deploy/tools.mk

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ./clients/python -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e './clients/python' -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test system-test-tools k8s-test-tools kserve-venv

# KServe's client for tests/test_kserve.py, in an environment of its own: kserve pulls in
# pandas, fastapi, the Kubernetes client and more, none of which the project needs.
KSERVE_VENV ?= .venv-kserve
KSERVE_VERSION := 0.21.0

$(KSERVE_VENV)/.installed:
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet kserve==$(KSERVE_VERSION)
	touch $@

kserve-venv: $(KSERVE_VENV)/.installed

# promtool and prometheus (Debian's package) for the metrics tests; chromium and its driver
# (Debian's packages) for the web console's browser tests (tests/test_console.py).
.PHONY: system-test-tools
system-test-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (promtool) for the metrics tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the console's browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null; }

serve: install
	$(VENV)/bin/vision-serve --host $(SERVE_HOST) $(SERVE_ARGS)

# Lint and types (well under a minute) before the suite: make test fails on either.
# The suite runs one test file at a time per worker (module-scoped servers stay in one process);
# much of it waits on servers and subprocesses, so two workers gain even on two cores; a third
# gains nothing there (the suite took 442 s with 2 and with 3, the cores 96% busy with 3).
PYTEST_WORKERS ?= 2
test: install-test lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# A long random run of the fuzz targets (make test runs a short, fixed pass of the same tests).
FUZZ_EXAMPLES ?= 20000
fuzz: install-test
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q $(PYTEST_ARGS)

protos: install-test
	$(PY) protos/generate.py

# The console's screenshots in docs/console/ (the README shows them), made by its browser tests.
screenshots: install-test
	CONSOLE_SCREENSHOTS=docs/console $(PY) -m pytest tests/test_console.py -q $(PYTEST_ARGS)

bench: install-test
	$(PY) -m bench.throughput $(BENCH_ARGS)

# Builds the image, runs it with a token and TLS, checks health, an inference and a refused
# management call, stops it with SIGTERM (minutes, gigabytes; not part of `make test`).
# Settings: ENGINE, IMAGE, PYTHON_IMAGE, TORCH_INDEX, BUILD_ARGS, SKIP_BUILD (deploy/image-test.sh).
image-test: install
	PY=$(PY) deploy/image-test.sh

clean:
	rm -rf $(VENV) $(KSERVE_VENV) .pytest_cache
