# Two entry points, each creating or reusing .venv by itself:
#   make quickstart   train LoKr on a tiny model and generated data (no network, no GPU)
#   make test         run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: quickstart test lint bench bench-gpu

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/lycoflow fit recipes/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lycoflow lycoris callbacks tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/adapters.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/eval.py

# The CUDA paths in one run (bf16, the 8-bit bases, torch.compile), figures as JSON in BENCH_OUT: what
# benchmarks/README.md has not measured yet (no GPU has run it so far).
BENCH_OUT ?= bench-gpu
bench-gpu: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/adapters.py --device cuda --bf16 --json $(BENCH_OUT)/adapters.json
	$(PY) benchmarks/train_step.py --parts sd15 sdxl bases --device cuda --bf16 --json $(BENCH_OUT)/train_step.json
	$(PY) benchmarks/train_step.py --parts quickstart sd15 --device cuda --bf16 --compile \
		--json $(BENCH_OUT)/train_step_compiled.json
