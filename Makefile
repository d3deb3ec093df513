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
	touch $@

install: $(BIN)/.installed

zoo: install
	$(BIN)/transerve zoo build --out $(ZOO) --repo $(REPO)

# The gRPC server arrives with issue #5; until then `make serve` builds the zoo and its repository.
serve: zoo
	@echo "zoo checkpoints in $(ZOO)/, verified model repository in $(REPO)/ (see: $(BIN)/transerve inspect $(REPO)/vit-digits-bn)."
	@echo "The gRPC server is not part of this version yet."

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
