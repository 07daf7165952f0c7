"""The `reference` backend: seqkern.reference run as it is. Slow, always available."""
import contextlib

import torch

from seqkern import reference

NAME = "reference"


@contextlib.contextmanager
def autograd_inside_op():
    """Lets the reference backward differentiate its forward with torch.autograd.

    A custom op's body runs below the Autograd dispatch key (it is excluded for the call),
    so ops there record no graph even under enable_grad; this lifts the exclusion for the
    block. Used only by the reference backend, which has no hand-written backward.
    """
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality,
                                              False), torch.enable_grad():
        yield


def availability(device):
    return []


def not_supported_reasons(op, inputs):
    return []


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                  scale, seed_offset):
    keep = reference.keep_mask_for(query, key, dropout_p, seed_offset)
    out, lse = reference.attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   key_padding_mask, keep)
    return _heads_inner(out), lse.to(_lse_dtype(query.dtype))


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                  dropout_p, is_causal, scale, seed_offset):
    keep = reference.keep_mask_for(query, key, dropout_p, seed_offset)
    with autograd_inside_op():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        ref_out, _ = reference.attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                         key_padding_mask, keep)
        grads = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    return tuple(_heads_inner(g) for g in grads)  # the layout the op's fake promises


def attention_weights(query, key, lse, attn_mask, key_padding_mask, is_causal, scale,
                      dropout_p, seed_offset, average_heads):
    keep = reference.keep_mask_for(query, key, dropout_p, seed_offset)
    return reference.attention_weights(query, key, lse, attn_mask, is_causal, scale,
                                       key_padding_mask, keep, dropout_p, average_heads)


def _heads_inner(tensor):
    """tensor [B, H, T, D] copied into the layout of the op's outputs (seqkern/ops/attention.py):
    a dense [B, T, H, D], transposed."""
    B, H, T, D = tensor.shape
    return tensor.new_empty((B, T, H, D)).transpose(1, 2).copy_(tensor)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  need_workspace, w_hr=None):
    from seqkern.ops import rnn_layer as ops
    out, h_n, c_n = ops.reference_forward(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                          b_hh, reverse, w_hr)
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    # The reference backward recomputes the forward: its workspace holds nothing.
    hidden = w_hh.shape[0] // ops.gate_count(mode)
    numel = ops.workspace_numel(mode, rows, hidden, w_hh.shape[1]) if need_workspace else 0
    workspace = torch.zeros(numel, dtype=ops.compute_dtype(input.dtype), device=input.device)
    c_n = c_n if c_n is not None else h0.new_empty((0,))
    return out, h_n, c_n, workspace


def rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  workspace, grad_output, grad_hn, grad_cn, needs, w_hr=None):
    from seqkern.ops import rnn_layer as ops
    grads = ops.reference_grads(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                reverse, grad_output, grad_hn, grad_cn, w_hr=w_hr, needs=needs)
    # Outputs of a custom op may not alias each other: a fresh empty tensor for each absent one.
    return [g if g is not None else h0.new_empty((0,)) for g in grads]


def rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """The cell in plain torch ops, keeping what rnn_cell_gate_grads needs (ops/rnn_cells.py)."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x, h_prev = input.to(acc), hx.to(acc)
    gi = torch.nn.functional.linear(x, w_ih.to(acc), None if b_ih is None else b_ih.to(acc))
    gh = torch.nn.functional.linear(h_prev, w_hh.to(acc), None if b_hh is None else b_hh.to(acc))
    empty = input.new_empty((0, 0))
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * cx.to(acc) + i * g
        saved = torch.cat([torch.cat([i, f, g, o], dim=1).flatten(), c.flatten()])
        return (o * c.tanh()).to(input.dtype), c.to(input.dtype), saved
    if mode == "GRU":
        gi_r, gi_z, gi_n = gi.chunk(3, dim=1)
        gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
        r, z = (gi_r + gh_r).sigmoid(), (gi_z + gh_z).sigmoid()
        n = (gi_n + r * gh_n).tanh()
        h = (1 - z) * n + z * h_prev
        return h.to(input.dtype), empty, torch.cat([r, z, n, gh_n], dim=1).flatten()
    pre = gi + gh
    h = pre.tanh() if mode == "RNN_TANH" else pre.relu()
    return h.to(input.dtype), empty, h.flatten().clone()  # outputs may not alias


def rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h, saved):
    """Gradients of the gate pre-activations (see seqkern/ops/rnn_cells.py for the layout)."""
    dtype, acc = hx.dtype, saved.dtype
    B, H = hx.shape
    dh = grad_h.to(acc)
    empty = hx.new_empty((0, 0))
    if mode == "LSTM":
        i, f, g, o = saved[:4 * B * H].view(B, 4 * H).chunk(4, dim=1)
        tanh_c = saved[4 * B * H:].view(B, H).tanh()
        dc = dh * o * (1 - tanh_c * tanh_c)
        if grad_c is not None:
            dc = dc + grad_c.to(acc)
        d_gates = torch.cat([dc * g * i * (1 - i), dc * cx.to(acc) * f * (1 - f),
                             dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], dim=1)
        return d_gates.to(dtype), empty, empty, (dc * f).to(dtype)
    if mode == "GRU":
        r, z, n, gh_n = saved.view(B, 4 * H).chunk(4, dim=1)
        dn = dh * (1 - z) * (1 - n * n)
        dz = dh * (hx.to(acc) - n) * z * (1 - z)
        dr = dn * gh_n * r * (1 - r)
        return (torch.cat([dr, dz, dn], dim=1).to(dtype),
                torch.cat([dr, dz, dn * r], dim=1).to(dtype), (dh * z).to(dtype), empty)
    y = saved.view(B, H)
    # relu: NaN passes dh, as torch's threshold_backward (y <= 0 is false for NaN)
    d_pre = dh * (1 - y * y) if mode == "RNN_TANH" else dh * (~(y <= 0)).to(acc)
    return d_pre.to(dtype), empty, empty, empty
