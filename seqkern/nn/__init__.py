"""Drop-in modules: swap the class name, keep everything else."""
from seqkern.nn.rnn import GRU, LSTM, RNN  # noqa: F401
