"""Attention weights from the forward's log-sum-exp in Triton: P = exp(q.k * scale + mask -
lse), zero on rows with no visible key, times keep / (1 - p) under dropout (the forward's
own keep-mask), averaged over heads inside the kernel when asked. Shares the masking,
dropout and launch helpers of kernels/attention.py.
"""
import triton
import triton.language as tl

from .attention import (  # noqa: F401  (the jit helpers are resolved from this module)
    _block_dim, _config, _device_guard, _dot, _dropout_args, _dropout_keep, _flags,
    _mask_args, _masked_scores, attention_not_supported_reasons,
)
from seqkern._debug import new_output


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "rng_offset"])
def _attention_weights_kernel(
        Q, K, Lse, W, Mask, Kpm,
        sqb, sqh, sql, sqd, skb, skh, sks, skd, swb, swh, swl, sws,
        smb, smh, sml, sms, spb, sps,
        Hq, group, L, S, D, scale, head_weight, dropout_p, dropout_scale,
        seed_lo, seed_hi, rng_offset,
        MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, AVERAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program owns a [BLOCK_M, BLOCK_N] tile of one batch and walks the heads, so the
    # head average is summed on chip and only [B, L, S] reaches memory.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    w_tile = W + b.to(tl.int64) * swb + offs_m[:, None] * swl + offs_n[None, :] * sws
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h_index in range(Hq):
        h = b * 0 + h_index  # a tensor, as the interpreter's range yields Python ints
        hk = h // group
        bh = b * Hq + h
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                    + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                    mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        k_t = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
                      + offs_n[None, :] * sks + offs_d[:, None] * skd,
                      mask=(offs_n[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, k_t, DOT_UPCAST) * scale
        s = _masked_scores(s, b, h, offs_m, offs_n, L, S, Mask, smb, smh, sml, sms,
                           Kpm, spb, sps, MASK_KIND, HAS_KPM, IS_CAUSAL)
        lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
        # A row with lse = -inf sees no key: exp(-inf - inf) = 0 rather than NaN.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        p = tl.exp(s - lse[:, None])
        if HAS_DROPOUT:
            keep = _dropout_keep(bh, offs_m, offs_n, L, S, dropout_p, seed_lo, seed_hi,
                                 rng_offset)
            p = tl.where(keep, p * dropout_scale, 0.0)
        if AVERAGE:
            total += p
        else:
            tl.store(w_tile + h.to(tl.int64) * swh, p.to(W.dtype.element_ty), mask=inside)
    if AVERAGE:
        tl.store(w_tile, (total * head_weight).to(W.dtype.element_ty), mask=inside)




def attention_weights(query, key, lse, attn_mask, key_padding_mask, is_causal, scale,
                      dropout_p, seed_offset, average_heads):
    """The probabilities exp(scale * q.k + mask - lse) of attention_fwd, from its lse.

    Args:
      query [B, Hq, L, D], key [B, Hkv, S, D], lse [B, Hq, L] fp32 (attention_fwd's),
      masks, is_causal, scale, dropout_p and seed_offset exactly as given to attention_fwd
      (so the returned weights are those that multiplied value).
      average_heads: return the mean over heads [B, L, S] instead of [B, Hq, L, S].

    Returns weights in query's dtype; rows with lse = -inf are 0.

    Example:
      >>> out, lse = attention_fwd(q, k, v, None, None, 0.0, False, 0.125, None)
      >>> w = attention_weights(q, k, lse, None, None, False, 0.125, 0.0, None, True)
    """
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    shape = (B, L, S) if average_heads else (B, Hq, L, S)
    weights = new_output(shape, query.dtype, query.device)
    if weights.numel() == 0:
        return weights
    if Hq == 0:
        return weights.zero_()
    lse = lse.contiguous()
    (mask, kpm, _), kind, mask_strides = _mask_args(query, attn_mask, key_padding_mask)
    has_dropout, p, p_scale, seed_lo, seed_hi, offset = _dropout_args(dropout_p, seed_offset)
    (block_m, block_n), _, num_warps, num_stages = _config(D, query.dtype)
    w_strides = weights.stride() if not average_heads else (
        weights.stride(0), 0, weights.stride(1), weights.stride(2))
    flags = _flags(query, kind, key_padding_mask, is_causal, has_dropout,
                   dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_dim(D)))
    with _device_guard(query):
        _attention_weights_kernel[(triton.cdiv(L, block_m), triton.cdiv(S, block_n), B)](
            query, key, lse, weights, mask, kpm,
            *query.stride(), *key.stride(), *w_strides, *mask_strides,
            Hq, Hq // Hkv, L, S, D, float(scale), 1.0 / Hq, p, p_scale, seed_lo, seed_hi,
            offset, AVERAGE=bool(average_heads), **flags,
            num_warps=num_warps, num_stages=num_stages)
    return weights


def attention_weights_not_supported_reasons(inputs):
    """Why attention_weights cannot run `inputs`; [] if it can (as for attention)."""
    return attention_not_supported_reasons(inputs)
