# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ZOO ?= zoo
REPO ?= repo
PACKAGES := common cli models export server clients/transerve_client

.PHONY: install zoo serve test lint typecheck protos openapi clean bench

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

# The REST API's OpenAPI document, generated from server/edge/rest.py's routes (tests/test_rest.py checks it is current)
openapi: install
	$(BIN)/python -c "from transerve.server.edge.rest import openapi_json; print(openapi_json(), end='')" > protos/openapi.json

# ruff; xenon (radon's ranks, which count boolean operators as ruff's C901 does not): no function worse than C;
# the import contracts in pyproject.toml (import-linter over the package assembled as installed: tools/package_tree.py)
lint: install
	$(BIN)/ruff check $(PACKAGES) tests bench tools
	$(BIN)/xenon --max-absolute C $(PACKAGES)
	$(BIN)/python tools/package_tree.py imports

# mypy over the package assembled as installed, so that every transerve.* import resolves (tools/package_tree.py)
typecheck: install
	$(BIN)/python tools/package_tree.py types

test: lint typecheck
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Every benchmark, in one run on this machine, each rewriting its section of bench/RESULTS.md (CPU, flags,
# commit and command beside each table). Nothing else should run meanwhile: the figures are timings.
BENCH_WORK ?= /tmp/transerve-bench
BENCHMARKS := \
	"precision_bench.py --repeats 5" \
	"export_bench.py --repeats 5" \
	"roofline.py --repeats 5" \
	"fusion_bench.py --zoo $(ZOO) --repeats 5" \
	"ct2_bench.py --work $(BENCH_WORK) --repeats 5" \
	"int8_format_bench.py --work $(BENCH_WORK) --repeats 5" \
	"server_bench.py --repo $(REPO) --repeats 5 --seconds 2" \
	"peers_bench.py --repo $(REPO) --work $(BENCH_WORK) --repeats 5 --seconds 2" \
	"rest_bench.py --repo $(REPO) --repeats 5 --seconds 2" \
	"loadtest_bench.py --repo $(REPO)" \
	"memory_bench.py --zoo-repo $(REPO) --work $(BENCH_WORK) --repeats 5 --requests 300" \
	"continuous_bench.py --work $(BENCH_WORK) --seconds 3 --repeats 5 --saturation-seconds 5" \
	"scaling_bench.py --repo $(REPO) --repeats 5 --duration 2" \
	"image_bench.py --repeats 5 --seconds 3" \
	"sentence_splitters.py --repeats 5" \
	"document_bench.py --work $(BENCH_WORK) --repeats 3" \
	"glossary_bench.py --repo $(REPO) --work $(BENCH_WORK) --repeats 3" \
	"language_detection_bench.py --repeats 3" \
	"language_routing_bench.py --work $(BENCH_WORK) --seconds 120"
bench: zoo
	@start=$$(date +%s); for b in $(BENCHMARKS); do \
		t=$$(date +%s); echo "== bench/$$b"; $(BIN)/python bench/$$b || exit 1; \
		echo "== bench/$$b: $$(( $$(date +%s) - t )) s"; done; \
	echo "make bench: $$(( $$(date +%s) - start )) s in all"

clean:
	rm -rf $(VENV) $(ZOO) $(REPO) .mypy_cache .ruff_cache .pytest_cache
