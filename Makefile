# The two commands of the README: `make bench` (the main job) and `make test` (everything CI
# checks). Both create .venv, install torch and the rest, and build fastattr._C with the CUDA
# kernels wherever torch is a CUDA build and nvcc is found (no GPU needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile and link even without a GPU.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_DEPS := pytest hypothesis "captum==0.9.*" zennit ruff expecttest tqdm matplotlib
BENCH_ARGS ?=

.PHONY: bench test build lint

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC) numpy setuptools wheel ninja
	$(PY) -m pip install --quiet $(TEST_DEPS)
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m fastattr info

bench: build
	$(VENV)/bin/fastattr bench $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: build lint
	$(PY) -m pytest -q -p no:cacheprovider
