"""Host emulation of csrc/cuda's kernels for tests/test_cuda_emulation.py (see build.py)."""
