"""Triton kernels, installed as seqkern.kernels. Importing this needs triton."""
import triton  # noqa: F401  (fail early and clearly when triton is missing)

from .attention import attention_bwd, attention_fwd, attention_not_supported_reasons  # noqa: F401
from .attention_weights import (  # noqa: F401
    attention_weights, attention_weights_not_supported_reasons,
)
from .rnn_cell import (  # noqa: F401
    rnn_cell_fwd, rnn_cell_gate_grads, rnn_cell_not_supported_reasons,
)
from .rnn_layer import (  # noqa: F401
    rnn_layer_bwd, rnn_layer_fwd, rnn_layer_not_supported_reasons,
)
