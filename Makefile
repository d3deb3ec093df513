# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ZOO ?= zoo
REPO ?= repo
PACKAGES := transerve models export server clients/transerve_client

.PHONY: install zoo serve test lint typecheck protos clean

$(BIN)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients -e '.[dev]'
	# timm: the timm-vit importer's reference model in the tests. Without its dependencies: its torchvision
	# pin resolves to a CUDA-only wheel for torch 2.13 (tests/test_importers_vit.py explains the stub).
	$(BIN)/python -m pip install --quiet --no-deps 'timm>=1.0.29,<1.1'
	touch $@

install: $(BIN)/.installed

zoo: install
	$(BIN)/transerve zoo build --out $(ZOO) --repo $(REPO)

PORT ?= 8001
METRICS_PORT ?= 8002

# Build (or reuse) the zoo and its repository, then serve it on 127.0.0.1 until Ctrl-C / SIGTERM.
serve: zoo
	$(BIN)/transerve serve --repo $(REPO) --host 127.0.0.1 --port $(PORT) --metrics-port $(METRICS_PORT)

protos: install
	$(BIN)/python clients/generate_protos.py

lint: install
	$(BIN)/ruff check $(PACKAGES) tests

typecheck: install
	$(BIN)/mypy $(PACKAGES)

test: lint typecheck
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) $(ZOO) $(REPO) .mypy_cache .ruff_cache .pytest_cache
