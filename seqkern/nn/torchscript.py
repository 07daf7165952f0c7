"""seqkern's modules under torch.jit.script: a clear error.

torch scripts its own LSTM, GRU, RNN, cells and MultiheadAttention; TorchScript cannot call
seqkern's ops from the Python forward, and scripting seqkern's failed deep inside the
compiler ("Lambda aren't supported", "Tensor (inferred) cannot be used as a tuple").
torch.jit.script calls __prepare_scriptable__ on every module first, so the error says what
happened and what works instead. (Returning torch's module there would script, but torch
writes what it returns into the caller's module tree: the eager model would silently lose
seqkern's kernels.) TorchScript itself is deprecated in this torch (torch.jit.script warns).
"""


class NotScriptable:
    """Mixin: torch.jit.script raises a RuntimeError naming the module and the ways that
    work (torch.compile, torch.export, or torch's own class with the same state_dict)."""

    def __prepare_scriptable__(self):
        name = type(self).__name__
        raise RuntimeError(
            f"seqkern.{name} cannot be scripted: TorchScript cannot call seqkern's custom "
            f"ops. Use torch.compile or torch.export (both supported), or script "
            f"torch.nn.{name} loaded with this module's state_dict.")
