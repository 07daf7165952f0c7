"""seqkern: fused attention and recurrent kernels for PyTorch.

Importing seqkern changes nothing global. The C++ extension (seqkern._C) is optional:
without it the `triton` and `reference` backends remain (`python -m seqkern.info`).
"""
from seqkern import functional, nn, ops, reference  # noqa: F401
from seqkern.backends import BackendError, backend  # noqa: F401
from seqkern.nn import (  # noqa: F401
    GRU, LSTM, RNN, GRUCell, LSTMCell, MultiheadAttention, RNNCell, swap_modules,
)

__version__ = "0.1.0"
