# Everything a developer or CI needs: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: help install demo test lint typecheck pytest bench bench-quick bench-cluster bench-instructions clean check-redis

help:
	@echo "make demo    run the demo on http://127.0.0.1:3000 (memory store; REDIS_URL=... for Redis)"
	@echo "make test    lint, type-check and run every test (starts a private redis-server)"
	@echo "make bench   side-by-side benchmarks (needs wrk and redis-server)"
	@echo "make bench-instructions   CPU instructions per request of each variant (needs valgrind)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rateguard needs Python >= 3.11; set PYTHON=python3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/uvicorn demo.app:app --host 127.0.0.1 --port 3000

check-redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server is not on the PATH; the Redis tests need a real one (they start it themselves)."; \
	  echo "  Debian/Ubuntu: sudo apt-get install -y redis-server"; \
	  echo "  macOS:         brew install redis"; \
	  exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check rateguard tests demo benchmarks
	$(BIN)/ruff format --check rateguard tests demo benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy rateguard

pytest: $(STAMP) check-redis
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP) check-redis
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP) check-redis
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run --quick

bench-cluster: $(STAMP) check-redis
	$(BIN)/python -m benchmarks.clusterbench

bench-instructions: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.instructions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
