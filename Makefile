# One entry point for every routine task. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One venv; each target installs only what it needs: running, testing, linting.
RUN := $(VENV)/.installed-run
TEST := $(VENV)/.installed-test
LINT := $(VENV)/.installed-lint
# Installs go through uv (from PyPI, into the venv): about 10 s where pip took over a minute
# on a cold cache, since uv fetches and unpacks in parallel. --compile-bytecode as pip does:
# else every daemon and CLI the tests spawn compiles grpc & co. again (PYTHONDONTWRITEBYTECODE).
# Should uv be unavailable or fail (its own network settings differ from pip's), pip does the
# same install: slower, never a different verdict.
UV := $(VENV)/bin/uv
install = { test -x $(PY) || $(PYTHON) -m venv $(VENV); } && \
	{ { test -x $(UV) || $(PY) -m pip install -q "uv>=0.5"; } && \
	  $(UV) pip install --python $(PY) --compile-bytecode -q -e ./client -e $(1) || \
	  { echo "uv could not install $(1): installing with pip"; \
	    $(PY) -m pip install -q -e ./client -e $(1); }; }

.PHONY: setup run test test-long lint typecheck proto proto-check bench clean redis-server \
	node-deps node-test node-proto node-proto-check node-bench
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.ci-stamp

setup: $(TEST) $(LINT)  ## the venv with everything a developer uses

$(RUN): pyproject.toml client/pyproject.toml
	$(call install,.)
	touch $@

$(TEST): pyproject.toml client/pyproject.toml
	$(call install,".[test]")
	touch $(RUN) $@

$(LINT): pyproject.toml client/pyproject.toml
	$(call install,".[lint]")
	touch $(RUN) $@

run: $(RUN)  ## the daemon on its embedded default: SQLite under ./var, loopback :50051
	$(VENV)/bin/limiterd serve $(ARGS)

# pytest and the Node client's suite run side by side (scripts/test-both.sh); both gate it.
# pytest runs two workers (pytest-xdist): tests are isolated (their own ports, temp dirs,
# daemons, redis-servers) and much of their time is waiting on a daemon. `ARGS="-n 0"`: one.
test: $(TEST) proto-check redis-server node-deps node-proto-check  ## all but the long crash loop; properties derandomized
	LIMITERD_HYPOTHESIS=repeatable scripts/test-both.sh $(PY) -m "not long" -n 2 $(ARGS)

# A new exploration seed each run, printed first; `make test-long SEED=n` re-runs one.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
test-long: $(TEST) redis-server  ## the 50-round crash loop; random property exploration
	@echo "hypothesis seed $(SEED): re-run with make test-long SEED=$(SEED)"
	LIMITERD_HYPOTHESIS=explore $(PY) -m pytest -m "long or hypothesis" \
	  --hypothesis-seed=$(SEED) $(ARGS)

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

lint: $(LINT)
	$(PY) -m ruff check .

typecheck: $(LINT)  ## mypy --strict on the daemon and the client
	$(PY) -m mypy limiterd client/src/limiterd_client

proto: $(TEST) node-proto  ## regenerate the stubs from proto/ (Python and TypeScript)
	$(PY) scripts/codegen.py

proto-check: $(TEST)  ## fail when the committed stubs differ from what proto/ generates
	@tmp=$$(mktemp -d) && $(PY) scripts/codegen.py $$tmp && \
	  diff -r -x __pycache__ $$tmp client/src/limiterd_client/proto > /dev/null || \
	  { echo "stale stubs: run 'make proto' and commit the result"; rm -rf $$tmp; exit 1; }; \
	  rm -rf $$tmp

# The Node client (clients/node): its packages from the committed lock, installed again only
# when the lock changes; its tests run against a real daemon from this venv.
node-deps: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { echo "node and npm (Node.js 20+) are needed for the Node client's tests: install them (e.g. apt-get install nodejs npm)"; exit 1; }
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' || \
	  { echo "Node.js 20+ is needed for the Node client, found $$(node --version)"; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

node-test: $(TEST) node-deps node-proto-check  ## the Node client's tests (node --test)
	cd $(NODE_DIR) && npm test --silent

node-bench: $(TEST) node-deps  ## what the Node client adds to an SDK call (never part of make test)
	cd $(NODE_DIR) && npm run bench --silent

node-proto: $(TEST) node-deps  ## regenerate the TypeScript stubs
	cd $(NODE_DIR) && PYTHON=$(abspath $(PY)) node scripts/codegen.mjs

node-proto-check: $(TEST) node-deps  ## fail when the committed TypeScript stubs are stale
	@tmp=$$(mktemp -d) && cd $(NODE_DIR) && PYTHON=$(abspath $(PY)) node scripts/codegen.mjs $$tmp && \
	  diff -r $$tmp src/gen > /dev/null || \
	  { echo "stale TypeScript stubs: run 'make proto' and commit the result"; rm -rf $$tmp; exit 1; }; \
	  rm -rf $$tmp

bench: $(RUN)  ## never part of `make test`; writes bench/out/results.md and goodput.png
	$(call install,".[bench]")
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
