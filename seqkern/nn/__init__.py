"""Drop-in modules: swap the class name, keep everything else."""
from seqkern.nn.multihead_attention import MultiheadAttention, swap_modules  # noqa: F401
from seqkern.nn.rnn import GRU, LSTM, RNN  # noqa: F401
from seqkern.nn.cells import GRUCell, LSTMCell, RNNCell  # noqa: F401
