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

.PHONY: test bench install cuda-check triton-check gpu-torch-check info clean

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

# Before a GPU run, on the CPU: seqkern built and linked against the GPU machine's torch
# ($(TORCH_GPU), a CUDA build: about 3 GB from PyPI into .venv-torch-gpu/), its CUDA kernels
# and torch binding included, then the suite on CPU tensors there (the op registration,
# torch.compile and the modules on that torch). A copy of the working tree is built
# (.venv-torch-gpu/src), so this checkout's seqkern._C stays as it is. CUDA_HOME: nvcc's
# toolkit; the headers torch's CUDA headers include that it lacks (cuBLAS, cuSPARSE, ...)
# come from that torch's nvidia packages. The Triton tests are left out: the GPU machine
# compiles Triton kernels, and triton 3.6's interpreter fails beside numpy 2.4. Last, the
# _C built (abi3: it loads under the GPU machine's Python 3.12 too) goes to gpu-prebuilt/
# with the stamp of its sources and torch (bench/prebuilt_stamp.sh): a GPU run that carries
# gpu-prebuilt/ installs it instead of compiling (bench/gpu_check.sh, ~2 min of device time).
TORCH_GPU ?= torch==2.11.0
GPU_VENV := .venv-torch-gpu
GPU_CUDA_HOME ?= /usr/local/cuda
gpu-torch-check:
	test -x $(GPU_VENV)/bin/python || python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q "$(TORCH_GPU)" pytest numpy expecttest \
	  setuptools wheel ninja
	rm -rf $(GPU_VENV)/cuda-extra $(GPU_VENV)/src && mkdir -p $(GPU_VENV)/cuda-extra $(GPU_VENV)/src
	for f in $(GPU_VENV)/lib/python3*/site-packages/nvidia/cu*/include/*; do \
	  test -e "$(GPU_CUDA_HOME)/include/$$(basename $$f)" || \
	  ln -s "$$(realpath $$f)" $(GPU_VENV)/cuda-extra/; done
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(GPU_VENV)/src
	cd $(GPU_VENV)/src && CUDA_HOME=$(GPU_CUDA_HOME) PATH="$(GPU_CUDA_HOME)/bin:$$PATH" \
	  CPATH=$(CURDIR)/$(GPU_VENV)/cuda-extra SEQKERN_CUDA_ARCHS=90a \
	  ../bin/python -m pip install -q -e . --no-build-isolation --no-deps
	cd $(GPU_VENV)/src && ../bin/python -m seqkern.info && ../bin/python -m pytest tests/ -q \
	  -m "not cuda_emulation" -k "not triton" -p no:cacheprovider
	rm -rf gpu-prebuilt && mkdir -p gpu-prebuilt
	$(GPU_VENV)/bin/python -c "import lzma, shutil, sys; \
	  shutil.copyfileobj(open(sys.argv[1], 'rb'), lzma.open(sys.argv[2], 'wb', preset=6))" \
	  $(GPU_VENV)/src/seqkern/_C.abi3.so gpu-prebuilt/_C.abi3.so.xz
	bash bench/prebuilt_stamp.sh "$$($(GPU_VENV)/bin/python -c 'import torch; print(torch.__version__)')" \
	  90a > gpu-prebuilt/stamp
	@echo "gpu-prebuilt/: carry it to the GPU run (run's carry: [\"gpu-prebuilt\"])"

clean:
	rm -rf build build-cmake build-triton-gpu gpu-prebuilt *.egg-info seqkern/_C*.so
