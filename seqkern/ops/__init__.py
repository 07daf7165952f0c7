"""The public torch.library ops (schemas, fakes, autograd), one file per op family."""
from seqkern.ops import attention, rnn_cells, rnn_layer  # noqa: F401
