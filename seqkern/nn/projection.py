"""An LSTM layer with a projection (proj_size P < H) run as a plain LSTM layer of hidden size
H, for backends whose recurrence has no projection step (the CUDA kernel).

With h = h_full W_hr^T, the gates of step t are x_t W_ih^T + h_{t-1} W_hh^T + b =
x_t W_ih^T + h_full_{t-1} (W_hh W_hr)^T + b: a plain LSTM over h_full with the recurrent
weight W_comb = W_hh W_hr [4H, H]. Its initial state h_full_0 is zero, and h0 W_hh^T enters
through the input instead: the input gets P more features, h0 at each sequence's first
processed step (the first step forward; the last live step of each sequence in reverse) and
zero elsewhere, with W_hh as their input weights. The output is then out_full W_hr^T and
h_n = h_n_full W_hr^T, one product each after the loop. Gradients flow through these torch
ops and the plain layer op's own backward.

Cost against a projection inside the recurrence: the recurrent product has H columns of K
instead of P (H/P times the recurrent FLOPs, which at the sizes where a GPU recurrence is
latency-bound cost little), and the input projection P more features (mostly zeros). In
exchange the whole recurrence is one launch of the CUDA persistent kernel. Rounding differs:
h_full (W_hh W_hr)^T instead of (h_full W_hr^T) W_hh^T.

Opt-in (SEQKERN_RNN_PROJ_VIA_PLAIN=1) until a GPU run has timed it against the Triton
layer, which runs projections natively (two launches a step).
"""
import os

import torch

from seqkern.ops.rnn_layer import rnn_layer_fwd


def use_plain_layer_for_projection():
    return os.environ.get("SEQKERN_RNN_PROJ_VIA_PLAIN", "0") == "1"


def _first_rows(batch_sizes, steps, batch, reverse, device):
    """The flat input row of each sequence's first processed step: a padded input [T, B, I]
    flattened has sequence b of time t at row t * B + b; packed data at offset_t + b."""
    if batch_sizes is None:
        t0 = steps - 1 if reverse else 0
        return torch.arange(batch, device=device) + t0 * batch
    sizes = batch_sizes.to("cpu", torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    b = torch.arange(int(sizes[0]), device="cpu")  # on the CPU with sizes, whatever the default
    if not reverse:
        return b.to(device)
    last = (sizes[None, :] > b[:, None]).sum(1) - 1  # each sequence's last time step
    return (offsets[last] + b).to(device)


def lstm_projection_via_plain_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                    reverse, need_workspace):
    """(out [..., P], h_n [B, P], c_n [B, H]) of an LSTM layer with projection w_hr [P, H],
    computed by one plain rnn_layer_fwd of hidden size H (module docstring)."""
    P, H = w_hr.shape
    rows = x.reshape(-1, x.shape[-1])
    first = _first_rows(batch_sizes, x.shape[0], h0.shape[0], reverse, x.device)
    injected = torch.zeros(rows.shape[0], P, dtype=x.dtype, device=x.device).index_copy(
        0, first, h0)
    x_aug = torch.cat([rows, injected], 1).reshape(*x.shape[:-1], x.shape[-1] + P)
    w_ih_aug = torch.cat([w_ih, w_hh], 1)
    w_comb = w_hh @ w_hr
    h_full0 = torch.zeros(h0.shape[0], H, dtype=h0.dtype, device=h0.device)
    out_full, h_n_full, c_n, _ = rnn_layer_fwd("LSTM", x_aug, batch_sizes, h_full0, c0,
                                               w_ih_aug, w_comb, b_ih, b_hh, reverse,
                                               need_workspace)
    return out_full @ w_hr.t(), h_n_full @ w_hr.t(), c_n
