"""Drop-in seqkern.LSTM, seqkern.GRU and seqkern.RNN.

They subclass torch.nn.RNNBase, the base of torch.nn.LSTM / GRU / RNN, so constructors,
validation errors, parameters (names, order, shapes, initialisation), state_dict,
flatten_parameters(), all_weights, _flat_weights and torch.func.functional_call behave
exactly as torch's. (Not torch.nn.LSTM itself: torch.compile refuses to trace instances of
torch.nn.LSTM/GRU/RNN, so `isinstance(m, torch.nn.LSTM)` is False for seqkern.LSTM.)
forward is seqkern's own: each layer and direction runs as one seqkern::rnn_layer_fwd op (a
whole-sequence kernel with the loop over time inside it), PackedSequence natively (only the
live rows of each step are computed; the reverse direction starts at each sequence's own
end).

LSTM with proj_size > 0 runs the same op with the projection inside the recurrence (the C++
kernel on the CPU, the Triton one on a GPU: the CUDA kernel has no projection step), or, with
SEQKERN_RNN_PROJ_VIA_PLAIN=1, as a plain LSTM layer of hidden size H with the projection
folded into its weights (seqkern/nn/projection.py: on a GPU, the CUDA persistent kernel).
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from seqkern import autocast, transforms
from seqkern.nn.projection import lstm_projection_via_plain_layer, use_plain_layer_for_projection
from seqkern.nn.torchscript import NotScriptable
from seqkern.nn.weights import registered
from seqkern.ops.rnn_layer import reference_forward, rnn_layer_fwd


_SIDE_STREAMS = {}


def _side_stream(device):
    """One side stream per CUDA device, made once (never a stream per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _on_side_stream(run, device):
    """run() on the device's side stream, after the work queued so far on the current one.
    The caller makes the current stream wait for it before using the results; autograd runs
    the backward of these ops on the side stream too, and synchronises with its consumers."""
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        results = run()
    for t in results:
        if t is not None and t.numel():
            t.record_stream(main)  # freed tensors wait for main's uses before reuse
    return results


def _stacked(states):
    """The layers' and directions' final states as one [L * D, B, H] tensor: for one layer
    and direction a view of the op's own, not a copy (torch.stack: ~2 us at T1)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


class _SeqkernRNNMixin(NotScriptable):
    """forward() shared by the three drop-ins; the rest is torch's own RNNBase."""

    def forward(self, input, hx=None):
        lstm = self.mode == "LSTM"
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        is_batched = True
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            batch_sizes, sorted_indices, unsorted_indices = None, None, None
            if input.dim() not in (2, 3):
                name = "RNN" if self.mode.startswith("RNN") else self.mode
                tail = " tensor" if name == "RNN" else ""
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D"
                                 f"{tail} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    hx = self._unbatched_hidden(hx)
            elif hx is not None:
                self._check_batched_hidden(hx)
            batch = input.size(batch_dim)
        if lstm and hx is not None and len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        # Under autocast: torch's dtype for this configuration (seqkern/autocast.py).
        given = () if hx is None else tuple(hx) if lstm else (hx,)
        result = autocast.module_dtype(self.mode, input, given, packed, self.proj_size > 0)
        compute = autocast.compute_dtype(self.mode, input, result)
        cell_state_dtype = autocast.cell_state_dtype(
            self.mode, input, given[1] if lstm and given else None, self.proj_size > 0, result)
        if compute is not None:
            input = input.to(compute)
            if hx is not None:
                hx = tuple(autocast.cast(hx, compute)) if lstm else hx.to(compute)
        elif input.dtype != self._flat_weights[0].dtype and \
                torch.is_autocast_enabled(input.device.type):
            # torch skips its dtype check under autocast and fails later, in a product.
            raise ValueError(f"input must have the type {self._flat_weights[0].dtype}, got "
                             f"type {input.dtype} (under autocast seqkern casts float32 input "
                             "and input in the autocast dtype only)")
        if hx is None:
            if not (packed and lstm):  # torch checks all but packed LSTM input here
                self.check_input(input, batch_sizes)  # (zero states of the expected sizes)
            # One zero state for every layer and direction: the op writes none of its inputs.
            h0 = [input.new_zeros((batch, out_size))] * (self.num_layers * directions)
            c0 = [input.new_zeros((batch, self.hidden_size))] * len(h0) if lstm else None
        else:
            if packed:
                hx = self.permute_hidden(hx, sorted_indices)
            if not (packed and lstm):
                self.check_forward_args(input, hx, batch_sizes)
            for state in (hx if lstm else (hx,)):
                if state.dtype != input.dtype or state.device != input.device:
                    raise RuntimeError(
                        "Input and hidden tensors are not the same dtype and device, found "
                        f"input tensor with {input.dtype} on {input.device} and hidden tensor "
                        f"with {state.dtype} on {state.device}")
            h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
        if not packed and input.size(0 if not self.batch_first else 1) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        x = input.transpose(0, 1) if (self.batch_first and not packed) else input
        h_n, c_n = [], []
        # On a GPU the reverse direction runs on a side stream, concurrently with the forward
        # one (a recurrence at small batch leaves most of the GPU idle). On the CPU both
        # cores already share each direction's rows.
        # Not under torch.func transforms (the reference runs there, and vmap's batched
        # tensors have no record_stream).
        under_transform = transforms.active()
        concurrent = (directions == 2 and x.is_cuda and not torch.compiler.is_compiling()
                      and not under_transform)
        for layer in range(self.num_layers):
            results = [None] * directions
            for direction in reversed(range(directions)):  # the side stream's work first
                index = layer * directions + direction
                weights = registered(self, self._all_weights[index])
                if compute is not None:
                    weights = autocast.cast(weights, compute)
                for name, w in zip(self._all_weights[index], weights):
                    if w.dtype != x.dtype:  # torch's products fail on them
                        raise RuntimeError(
                            f"{self.mode}: {name} is {w.dtype}, the input {x.dtype}: every "
                            "weight must have the input's dtype (torch: 'mat1 and mat2 must "
                            "have the same dtype')")
                args = (x, batch_sizes, h0[index], c0[index] if lstm else None, weights,
                        under_transform)
                if concurrent and direction == 1:
                    results[direction] = _on_side_stream(
                        lambda: self._run_layer(*args, reverse=True), x.device)
                else:
                    results[direction] = self._run_layer(*args, reverse=direction == 1)
            if concurrent:
                torch.cuda.current_stream(x.device).wait_stream(_side_stream(x.device))
            for out, h, c in results:
                h_n.append(h)
                c_n.append(c)
            outputs = [out for out, _, _ in results]
            x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        hidden = _stacked(h_n)
        if result is not None:  # under autocast: torch's result dtypes
            x, hidden = x.to(result), hidden.to(result)
        if lstm:
            c_n = _stacked(c_n)
            if cell_state_dtype is not None:
                c_n = c_n.to(cell_state_dtype)
            hidden = (hidden, c_n)
        if packed:
            return (PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        output = x.transpose(0, 1) if self.batch_first else x
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        return output, hidden

    def _run_layer(self, x, batch_sizes, h0, c0, weights, under_transform, reverse):
        w_ih, w_hh = weights[0], weights[1]
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        w_hr = weights[-1] if self.proj_size > 0 else None
        need_workspace = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
        if under_transform:  # torch.func / forward AD: plain torch ops
            return reference_forward(self.mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                     reverse, w_hr)
        if w_hr is not None and use_plain_layer_for_projection():
            return lstm_projection_via_plain_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                                   b_hh, w_hr, reverse, need_workspace)
        out, h, c, _ = rnn_layer_fwd(self.mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                     b_hh, reverse, need_workspace, w_hr)
        return out, h, c

    def _unbatched_hidden(self, hx):
        if self.mode == "LSTM":
            if hx[0].dim() != 2 or hx[1].dim() != 2:
                raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but "
                                   f"got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            return (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if hx.dim() != 2:
            raise RuntimeError("For unbatched 2-D input, hx should also be 2-D but got "
                               f"{hx.dim()}-D tensor")
        return hx.unsqueeze(1)

    def _check_batched_hidden(self, hx):
        if self.mode == "LSTM":
            if hx[0].dim() != 3 or hx[1].dim() != 3:
                raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but "
                                   f"got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != 3:
            raise RuntimeError("For batched 3-D input, hx should also be 3-D but got "
                               f"{hx.dim()}-D tensor")


class LSTM(_SeqkernRNNMixin, torch.nn.RNNBase):
    """torch.nn.LSTM on seqkern's whole-sequence kernels (same constructor and behaviour).

    LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
         bidirectional=False, proj_size=0, device=None, dtype=None)
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def get_expected_cell_size(self, input, batch_sizes):
        batch = int(batch_sizes[0]) if batch_sizes is not None else \
            input.size(0 if self.batch_first else 1)
        return (self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx, permutation):
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)


class GRU(_SeqkernRNNMixin, torch.nn.RNNBase):
    """torch.nn.GRU on seqkern's whole-sequence kernels (same constructor and behaviour)."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class RNN(_SeqkernRNNMixin, torch.nn.RNNBase):
    """torch.nn.RNN (tanh or relu) on seqkern's whole-sequence kernels.

    RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
        batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        args = list(args)
        nonlinearity = args.pop(3) if len(args) > 3 else kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)
