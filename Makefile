# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# CPU machines get the pinned CPU torch/triton from requirements-cpu.txt; on a machine with an NVIDIA
# driver the user's own torch is kept (pass PINS= to override either way).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PINS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "" || echo "-r requirements-cpu.txt")

.PHONY: setup demo test test-gpu lint typecheck unit bench-cpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-cpu.txt requirements-dev.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PINS) -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/longroll demo

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest -q -n 2

test: lint unit

# The whole suite on one CUDA GPU, Triton interpreter off (tests/conftest.py, LONGROLL_TEST_GPU=1), bounded to
# fit one 10-minute call; writes test_gpu.{xml,log,json} to GPU_OUT. Uses the machine's own python (a GPU image
# has its CUDA torch; it needs no venv and no network: missing test tools come from GPU_WHEELS when given).
GPU_PY ?= python3
GPU_OUT ?= results/gpu/test_gpu
GPU_WHEELS ?=
test-gpu:
	$(GPU_PY) scripts/run_gpu_tests.py --out $(GPU_OUT) $(if $(GPU_WHEELS),--wheels $(GPU_WHEELS))

bench-cpu: setup
	$(BIN)/python scripts/bench_cache_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
