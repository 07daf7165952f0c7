"""Triton kernels, installed as seqkern.kernels. Importing this needs triton."""
import triton  # noqa: F401  (fail early and clearly when triton is missing)

from .attention import attention_bwd, attention_fwd, attention_not_supported_reasons  # noqa: F401
from .rnn_layer import (  # noqa: E402,F401
    rnn_layer_bwd, rnn_layer_fwd, rnn_layer_not_supported_reasons,
)
