# Two commands matter: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench-peers bench-awq clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the local CPU build, so nothing pulls a CUDA build.
# The demo needs the library alone; the tests add their extras (pytest, triton, ray, ...).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m cmpq.runtime.cpu_kernel
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/cmpq demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q

# The side-by-side benchmark against the peers, in its own environment (the peers'
# pins differ from the test set-up's). llama.cpp is built once into the cmpq cache.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_MODELS ?= smollm2-135m gemma3-270m

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(BENCH_PY) -m pip install -q -c benchmarks/peers/constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

# AWQ (llm-compressor) pins an older transformers than cmpq: its own environment, which
# the peers benchmark calls in a child process (benchmarks/peers/awq_worker.py).
AWQ_VENV := .venv-awq
AWQ_STAMP := $(AWQ_VENV)/.installed

$(AWQ_STAMP): benchmarks/peers/awq-constraints.txt
	$(PYTHON) -m venv $(AWQ_VENV)
	$(AWQ_VENV)/bin/pip install -q --upgrade pip
	$(AWQ_VENV)/bin/pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(AWQ_VENV)/bin/pip install -q -c benchmarks/peers/awq-constraints.txt llmcompressor
	touch $(AWQ_STAMP)

bench-awq: $(AWQ_STAMP)

bench-peers: $(BENCH_STAMP) $(AWQ_STAMP)
	PIP=$(BENCH_VENV)/bin/pip benchmarks/peers/build_llama_cpp.sh
	for model in $(BENCH_MODELS); do $(BENCH_PY) benchmarks/peers/run_peers.py --model $$model || exit 1; done

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(AWQ_VENV) build src/*.egg-info
