# Two entry points (README): `make run` installs and runs the demo on the shipped tiny model,
# `make test` installs and runs lint + the test suite + an installed-wheel check.
# torch is pinned to the local CPU wheel only through constraints.txt (setup.cfg says torch>=2.4).
PYTHON ?= python3
# Two venvs: `make run` installs the package alone into VENV; `make test` adds onnx, the test tools, TensorRT's lean
# runtime and the SGLang CPU recipe into TEST_VENV. The recipe's CUDA torchvision wheel imports only through the
# tests' shim, so it must not share a venv with `make run` (transformers' image classes would fail to import there).
VENV ?= .venv
TEST_VENV ?= .venv-test
BIN := $(VENV)/bin
TEST_BIN := $(TEST_VENV)/bin
PIP_FLAGS := --disable-pip-version-check -q
CONSTRAINTS := -c constraints.txt
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test install install-test lint pytest wheel-check clean

%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/pip $(PIP_FLAGS) install $(CONSTRAINTS) torch

install: $(BIN)/python
	$(BIN)/pip $(PIP_FLAGS) install $(CONSTRAINTS) -e .

install-test: $(TEST_BIN)/python
	$(TEST_BIN)/pip $(PIP_FLAGS) install $(CONSTRAINTS) -e ".[onnx,test,loadtest,tensorrt-lean]"
	bash tests/sglang_support/install.sh $(TEST_VENV)   # a real SGLang server for the serving tests (CPU recipe)

run: install
	$(BIN)/sparsemm run

test: install-test lint pytest wheel-check

lint:
	$(TEST_BIN)/ruff check .
	$(TEST_BIN)/ruff format --check .

# The shim folder lets SGLang (and the CUDA torchvision wheel it needs) import on a CPU machine: test-only.
# loadgroup keeps the tests marked xdist_group("sglang") on one worker, with the suite's one SGLang server.
pytest:
	PYTHONPATH=tests/sglang_support/pythonpath $(TEST_BIN)/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider

# Build the wheel, install it (not editable) into a fresh venv and run the CLI there, so a missing
# package-data file or entry point fails CI.
wheel-check:
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(TEST_BIN)/python -m build --wheel --outdir build/wheel-check . > build/wheel-check/build.log 2>&1 || (cat build/wheel-check/build.log; exit 1)
	$(PYTHON) -m venv build/wheel-check/venv
	build/wheel-check/venv/bin/pip --disable-pip-version-check -q install $(CONSTRAINTS) build/wheel-check/*.whl
	cd build/wheel-check && venv/bin/sparsemm --help > /dev/null && venv/bin/sparsemm-export --help > /dev/null
	cd build/wheel-check && venv/bin/sparsemm loadtest --help > /dev/null && venv/bin/sparsemm serve --help > /dev/null
	cd build/wheel-check && venv/bin/python -c "import sparsemm.plugin, sparsemm.profiles, sparsemm.serving.loadtest, sparsemm.export, sparsemm.models"
	cd build/wheel-check && test -f "$$(venv/bin/sparsemm model-path tiny)/model.safetensors"
	cd build/wheel-check && SPARSEMM_CACHE_DIR=$$PWD/kernel-cache venv/bin/python -c "from sparsemm.plugin.kernels import cpu_decode as c; assert c.SOURCE.exists(); c._compiler() is None or c.build()"
	@echo "wheel-check: installed wheel works"

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
