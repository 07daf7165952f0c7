"""Calls into seqkern._C's kernel entry points (csrc/registration.cpp), shared by the `cpu`
and `cuda` backends: the dispatcher of seqkern_C routes each call by the tensors' device."""
import torch


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                  scale, seed_offset):
    return torch.ops.seqkern_C.attention_fwd(
        query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
        seed_offset)


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                  dropout_p, is_causal, scale, seed_offset):
    return torch.ops.seqkern_C.attention_bwd(
        grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
        is_causal, scale, seed_offset)


def attention_weights(query, key, lse, attn_mask, key_padding_mask, is_causal, scale,
                      dropout_p, seed_offset, average_heads):
    return torch.ops.seqkern_C.attention_weights(
        query, key, lse, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
        seed_offset, average_heads)


def rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  need_workspace, w_hr=None):
    return torch.ops.seqkern_C.rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh,
                                             b_ih, b_hh, reverse, need_workspace, w_hr)


def rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  workspace, grad_output, grad_hn, grad_cn, needs, w_hr=None):
    return torch.ops.seqkern_C.rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh,
                                             b_ih, b_hh, reverse, workspace, grad_output,
                                             grad_hn, grad_cn, needs, w_hr)


def rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return torch.ops.seqkern_C.rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h, saved):
    return torch.ops.seqkern_C.rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h, saved)


def rnn_cell_bwd(mode, grad_h, grad_c, input, hx, cx, w_ih, w_hh, has_bias, h, saved, needs):
    return tuple(torch.ops.seqkern_C.rnn_cell_bwd(mode, grad_h, grad_c, input, hx, cx, w_ih,
                                                  w_hh, has_bias, h, saved, needs))
