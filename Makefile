# Two commands do all set-up on a fresh machine:
#   make serve   create .venv, install, serve all three models
#   make test    create .venv, install with test tools, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SERVE_ARGS ?=

.PHONY: install install-test serve test fuzz protos bench lint clean

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

install-test: $(VENV)/.installed-test system-test-tools k8s-test-tools

# promtool and prometheus (Debian's package) for the metrics tests; kubectl for manifests.
.PHONY: system-test-tools
system-test-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (promtool) for the metrics tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

serve: install
	$(VENV)/bin/vision-serve $(SERVE_ARGS)

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

# A long random run of the fuzz targets (make test runs a short, fixed pass of the same tests).
FUZZ_EXAMPLES ?= 20000
fuzz: install-test
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q $(PYTEST_ARGS)

protos: install-test
	$(PY) protos/generate.py

bench: install-test
	$(PY) bench/throughput.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
