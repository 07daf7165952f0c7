"""seqkern.LSTMCell, GRUCell, RNNCell: torch.nn's cells with seqkern's fused step.

Each subclasses its torch.nn cell, so constructors, parameters (weight_ih, weight_hh,
bias_ih, bias_hh), initialisation, state_dict, repr and isinstance checks are torch's own;
only forward changes, and it raises torch's errors for bad input dims before the step.
Under autocast each computes in the dtype torch's cell does (seqkern/autocast.py).
"""
import torch

from seqkern import autocast
from seqkern import functional as F
from seqkern.nn.torchscript import NotScriptable
from seqkern.nn.weights import registered

WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _check_dims(cell, input, states, names):
    if input.dim() not in (1, 2):
        raise ValueError(f"{cell}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for name, s in zip(names, states):
        if s is not None and s.dim() not in (1, 2):
            raise ValueError(f"{cell}: Expected {name} to be 1D or 2D, got {s.dim()}D instead")


def _autocast(cell, input, *states_and_weights, states=1):
    """(input, *states_and_weights) cast to the dtype torch's `cell` returns under autocast,
    or as given (the first `states` of them are the cell's states, each may be None). The
    forwards call it only where autocast is on somewhere (autocast.any_enabled, 0.1 us):
    the call itself costs 0.3 us, a few percent of a small cell's step on the CPU."""
    # A cell computes in the dtype it returns (autocast.compute_dtype says why).
    compute = autocast.module_dtype(cell, input, states_and_weights[:states])
    if compute is None:
        return (input, *states_and_weights)
    return autocast.cast((input, *states_and_weights), compute)


class LSTMCell(NotScriptable, torch.nn.LSTMCell):
    """Drop-in torch.nn.LSTMCell. forward(input [B, I] or [I], hx=(h [B, H], c [B, H]) or
    None) -> (h', c').

    Example:
      >>> cell = seqkern.LSTMCell(64, 128)
      >>> h, c = cell(torch.randn(16, 64))
    """

    def forward(self, input, hx=None):
        states = (None, None) if hx is None else tuple(hx)
        if len(states) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        _check_dims("LSTMCell", input, states, ("hx[0]", "hx[1]"))
        args = (input, *states, *registered(self, WEIGHTS))
        if autocast.any_enabled():
            args = _autocast("LSTMCell", *args, states=2)
        return F.lstm_cell(*args)


class GRUCell(NotScriptable, torch.nn.GRUCell):
    """Drop-in torch.nn.GRUCell. forward(input [B, I] or [I], hx [B, H] or None) -> h'.

    Example:
      >>> h = seqkern.GRUCell(64, 128)(torch.randn(16, 64))
    """

    def forward(self, input, hx=None):
        _check_dims("GRUCell", input, (hx,), ("hidden",))
        args = (input, hx, *registered(self, WEIGHTS))
        if autocast.any_enabled():
            args = _autocast("GRUCell", *args)
        return F.gru_cell(*args)


class RNNCell(NotScriptable, torch.nn.RNNCell):
    """Drop-in torch.nn.RNNCell (nonlinearity "tanh" or "relu"). forward(input, hx) -> h'.

    Example:
      >>> h = seqkern.RNNCell(64, 128, nonlinearity="relu")(torch.randn(16, 64))
    """

    def forward(self, input, hx=None):
        _check_dims("RNNCell", input, (hx,), ("hidden",))
        args = (input, hx, *registered(self, WEIGHTS))
        if autocast.any_enabled():
            args = _autocast("RNNCell", *args)
        return F.rnn_cell(*args, self.nonlinearity)
