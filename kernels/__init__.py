"""Triton kernels, installed as seqkern.kernels. Importing this needs triton."""
import triton  # noqa: F401  (fail early and clearly when triton is missing)
