# One entry point for every routine task. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-long lint typecheck proto proto-check bench clean redis-server

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./client -e ".[dev]"
	touch $(STAMP)

run: setup  ## the daemon on its embedded default: SQLite under ./var, loopback :50051
	$(VENV)/bin/limiterd serve $(ARGS)

test: setup proto-check redis-server  ## everything but the long crash loop
	$(PY) -m pytest -m "not long" $(ARGS)

test-long: setup redis-server  ## the long tests (crash loop of 50+ rounds)
	$(PY) -m pytest -m long $(ARGS)

# The shared-ledger tests start real redis-server processes: install Debian's when missing
# (CI runs as root), or stop with one line saying what is needed.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server missing: installing Debian's (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends redis-server; } >/dev/null 2>&1; } ; \
	command -v redis-server >/dev/null 2>&1 || { \
	  echo "make test needs redis-server: 'apt-get install redis-server' failed (run as root or install it)"; \
	  exit 1; }

lint: setup
	$(PY) -m ruff check .

typecheck: setup  ## mypy --strict on the daemon and the client
	$(PY) -m mypy limiterd client/src/limiterd_client

proto: setup  ## regenerate the stubs from proto/
	$(PY) scripts/codegen.py

proto-check: setup  ## fail when the committed stubs differ from what proto/ generates
	@tmp=$$(mktemp -d) && $(PY) scripts/codegen.py $$tmp && \
	  diff -r -x __pycache__ $$tmp client/src/limiterd_client/proto > /dev/null || \
	  { echo "stale stubs: run 'make proto' and commit the result"; rm -rf $$tmp; exit 1; }; \
	  rm -rf $$tmp

bench: setup  ## never part of `make test`; writes bench/out/results.md and goodput.png
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
