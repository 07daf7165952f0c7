# Quick start: `make bench` and `make test`.
#   Without PYTHON: creates .venv (if missing) and installs torch ($(TORCH)), triton,
#   the test and bench tools and seqkern itself into it.
#   With PYTHON=python3: uses that interpreter as it is (offline, e.g. a GPU machine)
#   and installs only seqkern (--no-build-isolation --no-deps).
TORCH ?= torch==2.13.0
TRITON ?= triton
TOOLS ?= pytest pytest-benchmark numpy ninja expecttest
PYTEST_ARGS ?=

ifeq ($(strip $(PYTHON)),)
PY := .venv/bin/python
DEPS := .venv/.deps-installed
else
PY := $(PYTHON)
DEPS :=
endif

.PHONY: test bench install cuda-check triton-check info clean

.venv/.deps-installed:
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q "$(TORCH)" $(TRITON) $(TOOLS)
	touch $@

install: $(DEPS)
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps

test: install
	$(PY) -m pytest tests/ -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest bench/ -q -s $(PYTEST_ARGS)

info: install
	$(PY) -m seqkern.info

# CMake build of csrc/ without pip: CPU kernels against libtorch, CUDA sources with nvcc
# for sm_80 and sm_90a when nvcc is present (no GPU needed), the torch binding compiled
# (not linked) against torch's headers, and ptxas's resource report checked for spills.
cuda-check: $(DEPS)
	cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE="$$(command -v $(PY))"
	rm -rf build-cmake/CMakeFiles/seqkern_cuda_kernels.dir  # so ptxas reports every kernel
	cmake --build build-cmake -j $${MAX_JOBS:-2} > build-cmake/build.log 2>&1 \
	  || (tail -n 200 build-cmake/build.log; exit 1)
	$(PY) .ci/cuda_resources.py build-cmake/build.log
	cd build-cmake && ctest --output-on-failure

# Every Triton kernel compiled for sm_80 and sm_90 as a GPU launch would (no GPU needed;
# Triton's bundled ptxas): compile errors, spills and shared memory (.ci/triton_compile.py),
# with the triton installed here and with the GPU machine's ($(TRITON_GPU), from PyPI into
# build-triton-gpu/, put first on PYTHONPATH).
TRITON_GPU ?= triton==3.6.0
triton-check: install
	$(PY) .ci/triton_compile.py --jobs $${MAX_JOBS:-2}
	test -d build-triton-gpu/triton || \
	  $(PY) -m pip install -q --no-deps --target build-triton-gpu "$(TRITON_GPU)"
	PYTHONPATH=build-triton-gpu $(PY) .ci/triton_compile.py --jobs $${MAX_JOBS:-2}

clean:
	rm -rf build build-cmake build-triton-gpu *.egg-info seqkern/_C*.so
