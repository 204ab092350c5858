# The two commands of the README: `make bench` (the main job) and `make test` (everything CI
# checks). Both create .venv, install torch and the rest, and build fastattr._C with the CUDA
# kernels wherever torch is a CUDA build and nvcc is found (no GPU needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile and link even without a GPU.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# transformers: a small GPT-2 (random weights, no download) for captum's LLMGradientAttribution;
# mpmath (also torch's, through sympy): high-precision Gauss-Legendre values.
# zarr 3 (fastattr[data]: attribute_dataset) needs Python 3.11 or newer.
TEST_DEPS := pytest hypothesis "captum==0.9.*" zennit ruff expecttest tqdm matplotlib \
	mpmath "zarr==3.1.*; python_version >= '3.11'"
# The documentation site's tools, pinned: a new release may warn where this one does not, and
# the strict build fails on any warning.
DOCS_DEPS := mkdocs==1.6.1 mkdocs-material==9.8.1 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11
# The transformer LRP tests' oracle, lxt (AttnLRP), on the newest transformers its patches
# run on (from 5.0 its BERT module no longer imports); without its declared dependencies
# (bitsandbytes, open_clip_torch, accelerate, ...), of which its efficient mode imports only
# transformers, torchvision and zennit.
TEST_DEPS += "transformers==4.57.6"
LXT_SPEC := lxt==2.1
BENCH_ARGS ?=

# The oldest torch that pyproject.toml claims, as a CPU build: `make test` builds fastattr
# against it in a venv of its own and runs the core tests there (those that need neither
# torchvision nor zennit). A CPU wheel is a fraction of the CUDA one's size; point pip at one
# with OLDEST_TORCH_PIP_ARGS (e.g. --index-url or --find-links) where it is not found.
OLDEST_TORCH ?= torch==2.13.0+cpu
OLDEST_TORCH_PIP_ARGS ?=
OLDEST_VENV ?= .venv-oldest-torch
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_BUILD := build/oldest-torch
OLDEST_TESTS := tests/test_backend.py tests/test_ops.py tests/test_lrp_ops.py \
	tests/test_integrated_gradients.py tests/test_layer_neuron_ig.py tests/test_torch_private_api.py

.PHONY: bench test build lint docs test-oldest-torch

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC) numpy setuptools wheel ninja
	$(PY) -m pip install --quiet $(TEST_DEPS) $(DOCS_DEPS)
	$(PY) -m pip install --quiet --no-deps $(LXT_SPEC)
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m fastattr info

bench: build
	$(VENV)/bin/fastattr bench $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The site, into site/ (strict: a broken reference or a warning fails the build).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

$(OLDEST_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install --quiet --upgrade pip
	$(OLDEST_PY) -m pip install --quiet $(OLDEST_TORCH_PIP_ARGS) $(OLDEST_TORCH)
	$(OLDEST_PY) -m pip install --quiet numpy setuptools wheel ninja pytest hypothesis \
		"captum==0.9.*" expecttest
	touch $@

# fastattr built (CPU kernels) from a copy of the sources, installed into the oldest torch's
# venv, and the core tests run from outside the tree so that they import that build. The copy
# keeps the sources' times, so a rerun recompiles only what changed.
test-oldest-torch: $(OLDEST_VENV)/.installed
	mkdir -p $(OLDEST_BUILD)/src && rm -rf $(OLDEST_BUILD)/src/csrc $(OLDEST_BUILD)/src/fastattr
	tar --exclude='*.so' --exclude=__pycache__ -cf - setup.py pyproject.toml README.md csrc \
		fastattr | tar -xf - -C $(OLDEST_BUILD)/src
	cd $(OLDEST_BUILD)/src && FASTATTR_CUDA=0 ../../../$(OLDEST_PY) -m pip install --quiet \
		--no-build-isolation --no-deps .
	cd $(OLDEST_BUILD) && ../../$(OLDEST_PY) -c "import fastattr, torch; \
		assert fastattr.build_info()['compiled'], fastattr.build_info(); print('torch', torch.__version__)"
	cd $(OLDEST_BUILD) && ../../$(OLDEST_PY) -m pytest -q -p no:cacheprovider \
		-c ../../pyproject.toml --rootdir ../.. $(addprefix ../../,$(OLDEST_TESTS))

test: build lint test-oldest-torch
	$(PY) -m pytest -q -p no:cacheprovider
