"""seqkern::rnn_cell_fwd / seqkern::rnn_cell_bwd: one op pair for every recurrent cell.

LSTM, GRU and the vanilla RNN cells share the ops and differ by `mode` ("LSTM", "GRU",
"RNN_TANH", "RNN_RELU"), as they share one kernel per backend. Shapes (torch.nn's layout
and gate order): input [B, I], hx [B, H], cx [B, H] (LSTM, else None), w_ih [G*H, I],
w_hh [G*H, H], b_ih / b_hh [G*H] or both None, with G = 4 (LSTM i, f, g, o), 3 (GRU r, z,
n) or 1 (RNN).

The forward returns (h' [B, H], c' [B, H] for LSTM else [0, 0], saved): `saved` is what the
backward needs, flat, in fp32 (fp64 for fp64 inputs), in the whole-sequence layer's step
layout (csrc/cpu/rnn_pointwise_impl.h), so the CPU backward is the layer's own pointwise
step: LSTM gates [B, 4H] (activated i, f, g, o) then c' [B, H]; GRU [B, 4H] (r, z, n and
W_hn h + b_hn); RNN h' [B, H].

The backward is a fused pointwise kernel per backend (gradients of the gate
pre-activations, `rnn_cell_gate_grads`) followed by plain products, done here with
torch.matmul: dx = dG_ih W_ih, dh = dG_hh W_hh, dW_ih = dG_ih^T x, dW_hh = dG_hh^T h,
db = column sums; a backend that has the whole backward in one call (`rnn_cell_bwd`: cpu)
runs that instead.

Double backward: when the backward itself is differentiated (create_graph=True, seen as
grad mode being on inside the backward), it recomputes the step through
seqkern.reference's cell with autograd instead of calling rnn_cell_bwd, so gradients of
gradients come from PyTorch's own ops.
"""
from typing import Optional

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.autocast import kernel_dtypes_as_given
from seqkern.ops.registration import seqkern_op

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
SAVED = {"LSTM": 5, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}  # saved numel / (B * H)


def _check_2d(t, name, rows, cols, dtype, device):
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise RuntimeError(f"seqkern rnn: {name} must be [{rows}, {cols}], got {list(t.shape)}")
    if t.dtype != dtype or t.device != device:
        raise RuntimeError(f"seqkern rnn: {name} must be a {dtype} tensor on {device}, got "
                           f"{t.dtype} on {t.device}")


def check_cell_args(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """rnn_cell_fwd's arguments, checked before a kernel reads them, as csrc/rnn_args.h's
    check_cell_args does for the cpu and cuda entry points (CHECKS_ARGS): the Triton
    kernels index by these shapes without bounds checks (an hx wider than w_hh's columns, a
    short cx or w_ih gave wrong answers, no error)."""
    if mode not in MODES:
        raise ValueError(f"seqkern rnn cell: mode must be one of {MODES}, got {mode!r}")
    if input.dim() != 2:
        raise RuntimeError(f"seqkern rnn cell: input must be [B, I], got {list(input.shape)}")
    if hx.dim() != 2:
        raise RuntimeError(f"seqkern rnn cell: hx must be [B, H], got {list(hx.shape)}")
    (B, I), H, G = input.shape, hx.shape[1], GATES[mode]
    dtype, device = input.dtype, input.device
    _check_2d(hx, "hx", B, H, dtype, device)
    _check_2d(w_ih, "w_ih", G * H, I, dtype, device)
    _check_2d(w_hh, "w_hh", G * H, H, dtype, device)
    if (mode == "LSTM") != (cx is not None):
        raise RuntimeError("seqkern rnn cell: cx is given iff mode is LSTM")
    if cx is not None:
        _check_2d(cx, "cx", B, H, dtype, device)
    if (b_ih is None) != (b_hh is None):
        raise RuntimeError("seqkern rnn cell: b_ih and b_hh go together")
    for b in (b_ih, b_hh):
        if b is not None and (tuple(b.shape) != (G * H,) or b.dtype != dtype or
                              b.device != device):
            raise RuntimeError(f"seqkern rnn cell: biases must be [{G * H}] of the input's "
                               "dtype and device")


def check_gate_grad_args(mode, grad_h, grad_c, hx, cx, h, saved):
    """The gate gradients' arguments (csrc/rnn_args.h, check_gate_grad_args): grad_h, h and
    grad_c like hx, cx for LSTM, saved the forward's flat buffer."""
    if hx.dim() != 2:
        raise RuntimeError(f"seqkern rnn cell: hx must be [B, H], got {list(hx.shape)}")
    (B, H), dtype, device = hx.shape, hx.dtype, hx.device
    _check_2d(grad_h, "grad_h", B, H, dtype, device)
    _check_2d(h, "h", B, H, dtype, device)
    if grad_c is not None:
        _check_2d(grad_c, "grad_c", B, H, dtype, device)
    if mode == "LSTM":
        if cx is None:
            raise RuntimeError("seqkern rnn cell: the LSTM backward needs cx")
        _check_2d(cx, "cx", B, H, dtype, device)
    if (saved.dim() != 1 or saved.numel() != SAVED[mode] * B * H or
            saved.dtype != reference.accumulation_dtype(dtype) or saved.device != device):
        raise RuntimeError(f"seqkern rnn cell: saved must be the forward's flat "
                           f"{reference.accumulation_dtype(dtype)} buffer")


def _inputs(mode, input):
    return dict(device=input.device, dtype=input.dtype, mode=mode, input=input)


@seqkern_op("rnn_cell_fwd")
@kernel_dtypes_as_given
def rnn_cell_fwd(mode: str, input: Tensor, hx: Tensor, cx: Optional[Tensor], w_ih: Tensor,
                 w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.select("rnn_cell", _inputs(mode, input))
    if not backends.checks_own_args(impl):
        check_cell_args(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return impl.rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


@rnn_cell_fwd.register_fake
def _rnn_cell_fwd_fake(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    B, H = hx.shape
    h = input.new_empty((B, H))
    c = input.new_empty((B, H) if mode == "LSTM" else (0, 0))
    saved = input.new_empty((B * SAVED[mode] * H,),
                            dtype=reference.accumulation_dtype(input.dtype))
    return h, c, saved


@seqkern_op("rnn_cell_bwd")
@kernel_dtypes_as_given
def rnn_cell_bwd(mode: str, grad_h: Tensor, grad_c: Optional[Tensor], input: Tensor,
                 hx: Tensor, cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, has_bias: bool,
                 h: Tensor, saved: Tensor, needs: list[bool]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dhx, dcx, dw_ih, dw_hh, db_ih, db_hh).

    needs[k] says whether gradient k is wanted; an unwanted one (and dcx unless LSTM, the
    biases' without bias) comes back empty, [0], and its product is skipped: in a loop over
    a sequence the input rarely needs a gradient, and its product costs as much as dW's.
    """
    impl = backends.select("rnn_cell", _inputs(mode, input))
    fused = getattr(impl, "rnn_cell_bwd", None)
    if fused is not None:  # the backend does the products too (cpu: one C++ call)
        return fused(mode, grad_h, grad_c, input, hx, cx, w_ih, w_hh, has_bias, h, saved,
                     needs)
    if not backends.checks_own_args(impl):
        check_gate_grad_args(mode, grad_h, grad_c, hx, cx, h, saved)
    d_ih, d_hh, d_hx_direct, dcx = impl.rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h,
                                                            saved)
    if mode != "GRU":  # only GRU's n gate sees the hidden product through r
        d_hh = d_ih
    grads = [None] * 7
    if needs[0]:
        grads[0] = torch.matmul(d_ih, w_ih)
    if needs[1]:
        grads[1] = torch.matmul(d_hh, w_hh)
        if mode == "GRU":
            grads[1] += d_hx_direct
    if needs[2] and mode == "LSTM":
        grads[2] = dcx
    if needs[3]:
        grads[3] = torch.matmul(d_ih.t(), input)
    if needs[4]:
        grads[4] = torch.matmul(d_hh.t(), hx)
    if has_bias and needs[5]:
        grads[5] = d_ih.sum(0)
    if has_bias and needs[6]:
        grads[6] = d_hh.sum(0)
    return tuple(input.new_empty((0,)) if g is None else g for g in grads)


def _empty_grads(mode, input, hx, w_ih, w_hh, has_bias, needs):
    """The shapes rnn_cell_bwd returns: [0] for each gradient it does not compute."""
    bias = (w_ih.shape[0],) if has_bias else None
    shapes = (input.shape, hx.shape, hx.shape if mode == "LSTM" else None, w_ih.shape,
              w_hh.shape, bias, bias)
    return [input.new_empty(shape if (shape is not None and want) else (0,))
            for shape, want in zip(shapes, needs)]


@rnn_cell_bwd.register_fake
def _rnn_cell_bwd_fake(mode, grad_h, grad_c, input, hx, cx, w_ih, w_hh, has_bias, h, saved,
                       needs):
    return tuple(_empty_grads(mode, input, hx, w_ih, w_hh, has_bias, needs))


def _setup_context(ctx, inputs, output):
    mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    h, c, saved = output
    ctx.mark_non_differentiable(saved)
    # Unused outputs (saved, often c') then give None instead of a zero-filled gradient.
    ctx.set_materialize_grads(False)
    if mode != "LSTM":
        ctx.mark_non_differentiable(c)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, saved)
    ctx.mode = mode
    backends.remember_forced(ctx)


def reference_step(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """seqkern.reference's cell: (h', c') for LSTM, (h',) otherwise."""
    if mode == "LSTM":
        return reference.lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    if mode == "GRU":
        return (reference.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh),)
    return (reference.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh,
                               "tanh" if mode == "RNN_TANH" else "relu"),)


@kernel_dtypes_as_given
def _double_backward(ctx, grad_h, grad_c):
    """The backward, differentiable: recomputed through the reference cell (create_graph)."""
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, _, _ = ctx.saved_tensors
    args = (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    wanted = [i for i, t in enumerate(args) if t is not None and ctx.needs_input_grad[i + 1]]
    outs = reference_step(ctx.mode, *args)
    grads_out = (grad_h, grad_c)[:len(outs)]
    pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None]
    found = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted],
                                [g for _, g in pairs], create_graph=True, allow_unused=True)
    grads = [None] * len(args)
    for i, g in zip(wanted, found):
        grads[i] = g if g is not None else torch.zeros_like(args[i])
    return (None, *grads)


def _backward(ctx, grad_h, grad_c, grad_saved):
    mode = ctx.mode
    if torch.is_grad_enabled():
        return _double_backward(ctx, grad_h, grad_c if mode == "LSTM" else None)
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, saved = ctx.saved_tensors
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    if mode != "LSTM" or (grad_c is not None and grad_c.numel() == 0):
        grad_c = None
    needs = list(ctx.needs_input_grad[1:])
    with backends.as_in_forward(ctx):
        grads = rnn_cell_bwd(mode, grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih is not None,
                             h, saved, needs)
    return (None, *(g if want else None for g, want in zip(grads, needs)))


rnn_cell_fwd.register_autograd(_backward, setup_context=_setup_context)
