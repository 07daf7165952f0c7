"""The `reference` backend: seqkern.reference run as it is. Slow, always available."""
import torch

from seqkern import reference

NAME = "reference"


def availability(device):
    return []


def not_supported_reasons(op, inputs):
    return []


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                  scale, seed_offset):
    keep = _keep_mask(query, key, dropout_p, seed_offset)
    out, lse = reference.attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   key_padding_mask, keep)
    return out, lse.to(_lse_dtype(query.dtype))


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                  dropout_p, is_causal, scale, seed_offset):
    keep = _keep_mask(query, key, dropout_p, seed_offset)
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        ref_out, _ = reference.attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                         key_padding_mask, keep)
        return torch.autograd.grad(ref_out, (q, k, v), grad_out)


def _keep_mask(query, key, dropout_p, seed_offset):
    if dropout_p == 0.0:
        return None
    B, H, L, _ = query.shape
    return reference.dropout_keep_mask(seed_offset, B, H, L, key.shape[2], dropout_p,
                                       query.device)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
