"""seqkern::rnn_layer_fwd / seqkern::rnn_layer_bwd: one recurrent layer, one direction, over
a whole (optionally packed) sequence. Schemas, fakes and autograd.

Args of the forward: mode ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"); input [T, B, I]
time-major, or packed data [N, I] with batch_sizes ([T] int64 on the CPU, non-increasing);
h0 [B, H]; c0 [B, H] (LSTM) or None; w_ih [G*H, I], w_hh [G*H, H], b_ih, b_hh [G*H] or None
(G = 4 LSTM, 3 GRU, 1 RNN); reverse: run from the last step to the first (packed: from each
sequence's own end); w_hr [P, H] or None: LSTM's projection (proj_size P < H; the state is
then h = h_full W_hr^T, so h0 and h_n are [B, P], w_hh is [4H, P] and the output's last
dim is P). Returns output [T, B, H] or [N, H], h_n [B, H], c_n [B, H] (LSTM; else empty),
and a workspace (1-D, fp32 or fp64) that only the backward reads.
"""
import collections
import math
from typing import Optional

import torch
from torch import Tensor

from seqkern import backends
from seqkern.autocast import kernel_dtypes_as_given
from seqkern.ops.outputs import unviewed
from seqkern.ops.registration import seqkern_op

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


def gate_count(mode):
    return {"LSTM": 4, "GRU": 3}.get(mode, 1)


def workspace_numel(mode, rows, hidden, state=None):
    """Size of the forward's workspace: per (step, row) the saved gates, h_prev (state
    wide) and, for LSTM, c_prev and c_new, and with a projection h_full
    (csrc/cpu/rnn_layer.cpp)."""
    state = hidden if state is None else state
    saved = 4 * hidden if mode in ("LSTM", "GRU") else hidden
    return rows * (saved + state + (2 * hidden if mode == "LSTM" else 0) +
                   (hidden if state != hidden else 0))


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_layer_args(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
    """The layer op's arguments, checked before a kernel reads them, with the messages of
    csrc/rnn_args.h (check_layer_args), whose C++ checks the cpu and cuda entry points run
    themselves (CHECKS_ARGS). The Triton kernels index by these shapes without bounds
    checks: a w_hr, h0 or w_hh of the wrong size made them read and write out of bounds
    (memory corruption in the interpreter). Returns (B, H, P)."""
    def fail(message):
        raise RuntimeError(f"rnn_layer: {message}")

    if mode not in MODES:
        raise ValueError(f"rnn_layer: mode must be one of {MODES}, got {mode!r}")
    if not input.is_floating_point():
        fail(f"input must be a floating-point tensor, got {input.dtype}")
    G, lstm = gate_count(mode), mode == "LSTM"
    if input.dim() != (2 if batch_sizes is not None else 3):
        fail("input must be [T, B, I], or packed data [N, I] with batch_sizes")
    if w_hh.dim() != 2 or w_hh.shape[0] % G:
        fail("w_hh must be [G*H, P]")
    H, P = w_hh.shape[0] // G, w_hh.shape[1]
    if w_ih.dim() != 2 or tuple(w_ih.shape) != (G * H, input.shape[-1]):
        fail("w_ih must be [G*H, I]")
    if not (lstm and w_hr.dim() == 2 and tuple(w_hr.shape) == (P, H) and P < H
            if w_hr is not None else P == H):
        fail("w_hh must be [G*H, H], or [4H, P] with an LSTM projection w_hr [P, H], P < H")
    B = input.shape[1] if batch_sizes is None else 0
    if batch_sizes is not None:
        if batch_sizes.dim() != 1 or batch_sizes.device.type != "cpu":
            fail("batch_sizes must be a 1-D CPU tensor")
        sizes = batch_sizes.to(torch.int64)
        if sizes.numel() and (bool((sizes < 0).any()) or bool((sizes[1:] > sizes[:-1]).any())):
            fail("batch_sizes must be non-increasing, as torch packs them")
        total = int(sizes.sum())
        if total != input.shape[0]:
            fail(f"batch_sizes sum to {total} rows, the packed input has {input.shape[0]}")
        B = int(sizes[0]) if sizes.numel() else 0
    if h0.dim() != 2 or tuple(h0.shape) != (B, P):
        fail(f"h0 must be [{B}, {P}], got {list(h0.shape)}")
    if lstm and (c0 is None or c0.dim() != 2 or tuple(c0.shape) != (B, H)):
        fail(f"LSTM needs c0 [{B}, {H}]")
    if (b_ih is None) != (b_hh is None) or (
            b_ih is not None and (b_ih.numel() != G * H or b_hh.numel() != G * H)):
        fail("b_ih and b_hh go together, each [G*H]")
    if any(t is not None and t.device != input.device
           for t in (h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)):
        fail(f"every tensor must be on the input's device ({input.device})")
    return B, H, P


def check_layer_grads(mode, B, H, P, input, workspace, grad_output, grad_hn, grad_cn):
    """rnn_layer_bwd's workspace (a forward's of these arguments, as the CPU binding checks)
    and incoming gradients (csrc/rnn_args.h, check_layer_grads): grad_output with the
    output's N * P elements, grad_hn [B, P], grad_cn [B, H]."""
    N = math.prod(input.shape[:-1])
    if (workspace.dim() != 1 or workspace.numel() != workspace_numel(mode, N, H, P) or
            workspace.dtype != compute_dtype(input.dtype)):
        raise RuntimeError("rnn_layer_bwd: workspace does not come from rnn_layer_fwd with "
                           "these arguments")
    if grad_output is not None and grad_output.numel() != N * P:
        raise RuntimeError(f"rnn_layer_bwd: grad_output must have the output's {N * P} "
                           f"elements, got {list(grad_output.shape)}")
    if grad_hn is not None and tuple(grad_hn.shape) != (B, P):
        raise RuntimeError(f"rnn_layer_bwd: grad_hn must be h_n's [{B}, {P}]")
    if grad_cn is not None and tuple(grad_cn.shape) != (B, H):
        raise RuntimeError(f"rnn_layer_bwd: grad_cn must be c_n's [{B}, {H}]")


def _inputs(input, mode, w_hh, w_hr):
    return dict(device=input.device, dtype=input.dtype, input=input, mode=mode,
                gate_rows=w_hh.shape[0], projection=w_hr is not None)


# Which backend wrote each workspace, by the address of its data: the backward runs where
# the forward ran. The reference's workspace holds zeros (its backward recomputes the
# forward), and a backend forced around the forward reaches neither a compiled backward (the
# graph calls rnn_layer_bwd with none of the forward's thread-local state) nor, without the
# autograd context's copy, autograd's own thread: a kernel backward reading the reference's
# zeros gave wrong gradients, silently. A live workspace's address is its own, so the newest
# entry for an address describes it; the newest _PRODUCERS_KEPT addresses are kept, and a
# workspace whose entry was dropped (that many forwards before its backward) goes to the
# ordinary choice.
_PRODUCERS = collections.OrderedDict()
_PRODUCERS_KEPT = 4096


def _remember_producer(workspace, name):
    if workspace.numel() == 0:
        return
    key = (workspace.device, workspace.data_ptr())
    _PRODUCERS[key] = name
    _PRODUCERS.move_to_end(key)
    while len(_PRODUCERS) > _PRODUCERS_KEPT:
        _PRODUCERS.popitem(last=False)


def workspace_producer(workspace):
    """The backend module that wrote workspace, or None if not known."""
    if workspace.numel() == 0:
        return None
    name = _PRODUCERS.get((workspace.device, workspace.data_ptr()))
    return backends.BACKENDS[name] if name is not None else None


@seqkern_op("rnn_layer_fwd")
@kernel_dtypes_as_given
def rnn_layer_fwd(mode: str, input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor,
                  c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor], reverse: bool, need_workspace: bool = True,
                  w_hr: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backends.select("rnn_layer", _inputs(input, mode, w_hh, w_hr))
    if not backends.checks_own_args(impl):
        check_layer_args(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    result = impl.rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                reverse, need_workspace, w_hr)
    _remember_producer(result[3], impl.NAME)
    # Contiguous, as the fake says: inductor asserts the real outputs' strides.
    return tuple(unviewed(t.contiguous()) for t in result)


@rnn_layer_fwd.register_fake
def _rnn_layer_fwd_fake(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                        need_workspace=True, w_hr=None):
    H, P = w_hh.shape[0] // gate_count(mode), w_hh.shape[1]
    out = input.new_empty((*input.shape[:-1], P))
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    workspace = input.new_empty((workspace_numel(mode, rows, H, P) if need_workspace else 0,),
                                dtype=compute_dtype(input.dtype))
    c_n = c0.new_empty(c0.shape) if mode == "LSTM" else h0.new_empty((0,))
    return out, h0.new_empty(h0.shape), c_n, workspace


@seqkern_op("rnn_layer_bwd")
@kernel_dtypes_as_given
def rnn_layer_bwd(mode: str, input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor,
                  c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor], reverse: bool, workspace: Tensor,
                  grad_output: Optional[Tensor], grad_hn: Optional[Tensor],
                  grad_cn: Optional[Tensor], needs: list[bool],
                  w_hr: Optional[Tensor] = None) -> list[Tensor]:
    """(d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_w_hr), [0] where absent or
    where needs[k] is false: an unwanted gradient's product is skipped (dx of a first layer
    whose input is data costs as much as dW_ih). Runs on the backend that wrote the
    workspace where that is known (_PRODUCERS), else on the ordinary choice."""
    if len(needs) != len(GRAD_NAMES):
        raise ValueError(f"rnn_layer_bwd: needs must have {len(GRAD_NAMES)} entries "
                         f"({', '.join(GRAD_NAMES)}), got {len(needs)}")
    impl = (workspace_producer(workspace) or
            backends.select("rnn_layer", _inputs(input, mode, w_hh, w_hr)))
    if not backends.checks_own_args(impl):
        dims = check_layer_args(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        check_layer_grads(mode, *dims, input, workspace, grad_output, grad_hn, grad_cn)
    grads = impl.rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                               reverse, workspace, grad_output, grad_hn, grad_cn, needs, w_hr)
    # Contiguous, as the fake says (the reference's autograd gradients of a strided input
    # come back strided; inductor asserts the real outputs' strides).
    return [unviewed(g.contiguous()) for g in grads]


@rnn_layer_bwd.register_fake
def _rnn_layer_bwd_fake(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                        workspace, grad_output, grad_hn, grad_cn, needs, w_hr=None):
    wrt = (input, h0, c0 if mode == "LSTM" else None, w_ih, w_hh, b_ih, b_hh, w_hr)
    return [t.new_empty(t.shape) if t is not None and want else h0.new_empty((0,))
            for t, want in zip(wrt, needs)]


GRAD_NAMES = ("d_input", "d_h0", "d_c0", "d_w_ih", "d_w_hh", "d_b_ih", "d_b_hh", "d_w_hr")


def grad_needs(needs_input_grad):
    """rnn_layer_bwd's needs from the forward's needs_input_grad (its arguments' order; a
    call that leaves w_hr at its default has no entry for it)."""
    return [i < len(needs_input_grad) and bool(needs_input_grad[i])
            for i in (1, 3, 4, 5, 6, 7, 8, 11)]


def _setup_context(ctx, inputs, output):
    (mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, need_workspace,
     w_hr) = inputs
    ctx.mark_non_differentiable(output[3])
    # Unused outputs (h_n, c_n, the workspace) then give None instead of zero-filled
    # gradients: for the 92 MB workspace of a fastrnns LSTM that fill cost ~9 ms a step.
    ctx.set_materialize_grads(False)
    ctx.mode, ctx.reverse = mode, reverse
    backends.remember_forced(ctx)
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, output[3])


def _backward(ctx, grad_output, grad_hn, grad_cn, _grad_workspace):
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, workspace = ctx.saved_tensors
    needs = grad_needs(ctx.needs_input_grad)
    if torch.is_grad_enabled() or workspace.numel() == 0:
        # create_graph=True (double backward), or a forward run with need_workspace=False:
        # differentiate the reference instead.
        grads = reference_grads(ctx.mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                ctx.reverse, grad_output, grad_hn, grad_cn, create_graph=True,
                                w_hr=w_hr, needs=needs)
    else:
        with backends.as_in_forward(ctx):
            grads = rnn_layer_bwd(ctx.mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                  ctx.reverse, workspace, grad_output, grad_hn,
                                  grad_cn if ctx.mode == "LSTM" else None, needs, w_hr)
    # An unwanted gradient (its product skipped) is [0] or None: autograd gets None.
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = (g if want else None
                                                       for g, want in zip(grads, needs))
    return (None, dx, None, dh0, dc0 if c0 is not None else None, dw_ih, dw_hh,
            db_ih if b_ih is not None else None, db_hh if b_hh is not None else None, None,
            None, dw_hr if w_hr is not None else None)


def reference_forward(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                      w_hr=None):
    """seqkern.reference.recurrent_layer with the op's argument conventions."""
    from seqkern.reference import recurrent_layer
    kind, _, nonlinearity = mode.partition("_")
    return recurrent_layer(kind, input, h0, (w_ih, w_hh, b_ih, b_hh), c0=c0, reverse=reverse,
                           nonlinearity=(nonlinearity or "tanh").lower(),
                           batch_sizes=batch_sizes, w_hr=w_hr)


@kernel_dtypes_as_given
def reference_grads(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                    grad_output, grad_hn, grad_cn, create_graph=False, w_hr=None, needs=None):
    """Gradients of the reference layer for (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    (zeros where none flows, None where the argument is None or needs says it is not wanted;
    needs=None: all)."""
    from seqkern.backends.reference import autograd_inside_op
    args = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    wanted = [t is not None and (needs is None or bool(want))
              for t, want in zip(args, needs or [True] * len(args))]
    if not any(wanted):
        return [None] * len(args)
    with autograd_inside_op():
        leaves = [t if not want or t.requires_grad else t.detach().requires_grad_(True)
                  for t, want in zip(args, wanted)]
        out, h_n, c_n = reference_forward(mode, leaves[0], batch_sizes, *leaves[1:7], reverse,
                                          w_hr=leaves[7])
        pairs = [(o, g) for o, g in ((out, grad_output), (h_n, grad_hn), (c_n, grad_cn))
                 if o is not None and g is not None]
        wrt = [t for t, want in zip(leaves, wanted) if want]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                       create_graph=create_graph, allow_unused=True))
    grads = [next(got) if want else None for want in wanted]
    return [g if g is not None or not want else torch.zeros_like(t)
            for g, t, want in zip(grads, leaves, wanted)]


rnn_layer_fwd.register_autograd(_backward, setup_context=_setup_context)
