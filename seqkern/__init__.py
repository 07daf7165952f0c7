"""seqkern: fused attention and recurrent kernels for PyTorch.

Importing seqkern changes nothing global. The C++ extension (seqkern._C) is optional:
without it the `triton` and `reference` backends remain (`python -m seqkern.info`).
"""
from seqkern import functional, nn, ops, reference  # noqa: F401
from seqkern.backends import BackendError, backend  # noqa: F401
from seqkern.nn import GRU, LSTM, RNN, MultiheadAttention, swap_modules  # noqa: F401

__version__ = "0.1.0"
