"""The `cpu` backend: the C++ kernels of seqkern._C (csrc/cpu/) on CPU tensors."""
import torch

from seqkern import _extension

NAME = "cpu"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def availability(device):
    if not _extension.available():
        return [f"seqkern._C is not built or failed to load ({_extension.load_error}); "
                "reinstall with `pip install -e . --no-build-isolation`"]
    if device != "cpu":
        return [f"runs on CPU tensors only, got {device} tensors"]
    return []


def not_supported_reasons(op, inputs):
    reasons = availability(inputs["device"].type)
    if inputs["dtype"] not in _DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32, fp64")
    return reasons


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
                  need_workspace):
    return torch.ops.seqkern_C.rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh,
                                             b_ih, b_hh, reverse, need_workspace)


def rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  workspace, grad_output, grad_hn, grad_cn):
    return torch.ops.seqkern_C.rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh,
                                             b_ih, b_hh, reverse, workspace, grad_output,
                                             grad_hn, grad_cn)


def rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return torch.ops.seqkern_C.rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h, saved):
    return torch.ops.seqkern_C.rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h, saved)
