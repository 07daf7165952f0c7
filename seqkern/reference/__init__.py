"""Readable pure-PyTorch versions of every seqkern op: the test oracle and benchmark baseline."""
from seqkern.reference.attention import (  # noqa: F401
    attention, attention_weights, attention_weights_backward, dropout_keep_mask,
    keep_mask_for,
)
from seqkern.reference.rnn import (  # noqa: F401
    accumulation_dtype, gru_cell, lstm_cell, rnn_cell, recurrent_layer,
)
