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
    keep = _keep_mask(query, key, dropout_p, seed_offset)
    out, lse = reference.attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   key_padding_mask, keep)
    return _heads_inner(out), lse.to(_lse_dtype(query.dtype))


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                  dropout_p, is_causal, scale, seed_offset):
    keep = _keep_mask(query, key, dropout_p, seed_offset)
    with autograd_inside_op():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        ref_out, _ = reference.attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                         key_padding_mask, keep)
        grads = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    return tuple(_heads_inner(g) for g in grads)  # the layout the op's fake promises


def attention_weights(query, key, lse, attn_mask, key_padding_mask, is_causal, scale,
                      dropout_p, seed_offset, average_heads):
    keep = _keep_mask(query, key, dropout_p, seed_offset)
    return reference.attention_weights(query, key, lse, attn_mask, is_causal, scale,
                                       key_padding_mask, keep, dropout_p, average_heads)


def _heads_inner(tensor):
    """tensor [B, H, T, D] copied into the layout of the op's outputs (seqkern/ops/attention.py):
    a dense [B, T, H, D], transposed."""
    B, H, T, D = tensor.shape
    return tensor.new_empty((B, T, H, D)).transpose(1, 2).copy_(tensor)


def _keep_mask(query, key, dropout_p, seed_offset):
    if dropout_p == 0.0:
        return None
    B, H, L, _ = query.shape
    return reference.dropout_keep_mask(seed_offset, B, H, L, key.shape[2], dropout_p,
                                       query.device)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  need_workspace):
    from seqkern.ops import rnn_layer as ops
    out, h_n, c_n = ops.reference_forward(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                          b_hh, reverse)
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    # The reference backward recomputes the forward: its workspace holds nothing.
    numel = ops.workspace_numel(mode, rows, w_hh.shape[1]) if need_workspace else 0
    workspace = torch.zeros(numel, dtype=ops.compute_dtype(input.dtype), device=input.device)
    c_n = c_n if c_n is not None else h0.new_empty((0,))
    return out, h_n, c_n, workspace


def rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  workspace, grad_output, grad_hn, grad_cn):
    from seqkern.ops import rnn_layer as ops
    grads = ops.reference_grads(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                reverse, grad_output, grad_hn, grad_cn)
    # Outputs of a custom op may not alias each other: a fresh empty tensor for each absent one.
    return [g if g is not None else h0.new_empty((0,)) for g in grads]
