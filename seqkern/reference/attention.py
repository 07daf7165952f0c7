"""Reference masked attention, written for clarity: the oracle every kernel is tested against.

Conventions (shared by all backends):
  query [B, Hq, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv], Hq a multiple of Hkv
  (grouped-query attention: query head h reads key/value head h // (Hq // Hkv)).
  attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
  [B, Hq, L, S]. key_padding_mask: [B, S] bool, True = padding, ignored.
  is_causal: key j is visible to query i iff j <= i (top-left aligned when L != S).
  A query row with no visible key has output 0 and lse -inf (never NaN).
"""
import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x):
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def dropout_keep_mask(seed_offset, batch, heads, q_len, k_len, dropout_p, device=None):
    """The keep-mask ([B, Hq, L, S] bool) that every backend realises for a seed.

    The kernels draw their dropout from a counter-based generator: element (b, h, i, j)
    has counter c = ((b * Hq + h) * L + i) * S + j + offset, and is kept iff
    hash(seed, c) / 2**24 >= dropout_p, where hash mixes the two 32-bit halves of c with
    the seed through murmur3's finalizer. Nothing is stored; the backward regenerates it.
    """
    seed, offset = (int(v) for v in seed_offset.tolist())
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    counter = torch.arange(batch * heads * q_len * k_len, dtype=torch.int64,
                           device=device) + offset
    bits = _fmix32((counter & _MASK32) ^ seed_lo)
    bits = _fmix32(bits ^ ((counter >> 32) & _MASK32) ^ seed_hi)
    uniform = (bits >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return (uniform >= dropout_p).reshape(batch, heads, q_len, k_len)


def keep_mask_for(query, key, dropout_p, seed_offset):
    """dropout_keep_mask for attention of query [B, H, L, D] over key [.., S, D]: the
    kernels' realised keep-mask for seed_offset, or None without dropout."""
    if dropout_p == 0.0 or seed_offset is None:
        return None
    B, H, L, _ = query.shape
    return dropout_keep_mask(seed_offset, B, H, L, key.shape[2], dropout_p, query.device)


def attention_scores(query, key, attn_mask=None, is_causal=False, scale=None,
                     key_padding_mask=None):
    """Masked, scaled scores [B, Hq, L, S] (masked entries are -inf), in query's dtype."""
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if Hkv != Hq:
        key = key.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, neg_inf)
        else:
            scores = scores + attn_mask
    if is_causal:
        visible = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = torch.where(visible, scores, neg_inf)
    if key_padding_mask is not None:
        scores = torch.where(key_padding_mask[:, None, None, :], neg_inf, scores)
    return scores


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, key_padding_mask=None, keep_mask=None):
    """Reference attention. Returns (out [B, Hq, L, Dv], lse [B, Hq, L]).

    Dropout is applied only through an explicit keep_mask ([B, Hq, L, S] bool), so that
    the result is deterministic and comparable with the kernels' realised mask. fp16 /
    bf16 are computed in fp32 (out rounded back, lse fp32), as the kernels accumulate: in
    fp16 itself q k^T overflowed to NaN at |scores| beyond 6e4, and a -1e4 mask swamped the
    scores' precision.
    """
    if query.dtype in (torch.float16, torch.bfloat16):
        mask = attn_mask.float() if attn_mask is not None and \
            attn_mask.is_floating_point() else attn_mask
        out, lse = attention(query.float(), key.float(), value.float(), mask, dropout_p,
                             is_causal, scale, key_padding_mask, keep_mask)
        return out.to(query.dtype), lse
    Hq, Hkv = query.shape[1], key.shape[1]
    scores = attention_scores(query, key, attn_mask, is_causal, scale, key_padding_mask)
    # Rows with no visible key: exp(-inf - -inf) would be NaN, in the forward and in
    # logsumexp's backward (which would leak NaN through a float mask's -inf into dq and
    # dk). Such rows take the logsumexp of zeros, then lse -inf, and their probs are 0.
    empty = torch.isneginf(scores).all(dim=-1)
    lse = torch.logsumexp(torch.where(empty[..., None], 0.0, scores), dim=-1)
    lse = torch.where(empty, float("-inf"), lse)
    safe_lse = torch.where(empty, 0.0, lse)
    probs = torch.exp(scores - safe_lse[..., None])
    if keep_mask is not None and dropout_p > 0.0:
        probs = probs * keep_mask / (1.0 - dropout_p)
    if Hkv != Hq:
        value = value.repeat_interleave(Hq // Hkv, dim=1)
    return torch.matmul(probs, value), lse


def attention_weights(query, key, lse, attn_mask=None, is_causal=False, scale=None,
                      key_padding_mask=None, keep_mask=None, dropout_p=0.0,
                      average_heads=True):
    """The attention probabilities behind attention()'s output, from its lse.

    Returns exp(scores - lse) ([B, Hq, L, S], or averaged over heads to [B, L, S]) in
    query's dtype, computed in lse's dtype; times keep_mask / (1 - dropout_p) when
    dropout_p > 0 (the weights that multiplied value). Rows with lse = -inf are 0.
    """
    acc = lse.dtype
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() \
        else attn_mask
    scores = attention_scores(query.to(acc), key.to(acc), mask, is_causal, scale,
                              key_padding_mask)
    # exp(-inf - inf) = 0 for a row with no visible key, instead of exp(-inf + inf) = NaN.
    shift = torch.where(torch.isneginf(lse), float("inf"), lse)
    probs = torch.exp(scores - shift[..., None])
    if keep_mask is not None and dropout_p > 0.0:
        probs = probs * keep_mask / (1.0 - dropout_p)
    if average_heads:
        probs = probs.mean(dim=1)
    return probs.to(query.dtype)


def attention_weights_backward(grad_weights, query, key, attn_mask=None, is_causal=False,
                               scale=None, key_padding_mask=None, keep_mask=None,
                               dropout_p=0.0, average_heads=True):
    """(dq, dk) of attention_weights, through the softmax (the lse moves with q and k)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    scale = D ** -0.5 if scale is None else scale
    q, k = query.to(acc), key.to(acc)
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() \
        else attn_mask
    scores = attention_scores(q, k, mask, is_causal, scale, key_padding_mask)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, 0.0, scores), dim=-1, keepdim=True)
    probs = torch.where(empty, 0.0, torch.exp(scores - lse))
    grad = grad_weights.to(acc)
    grad = grad[:, None] / Hq if average_heads else grad
    if keep_mask is not None and dropout_p > 0.0:
        grad = grad * keep_mask / (1.0 - dropout_p)
    dscores = probs * (grad - (grad * probs).sum(dim=-1, keepdim=True)) * scale
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
    dq = torch.matmul(dscores, k)
    dk = torch.matmul(dscores.transpose(-1, -2), q)
    if Hkv != Hq:
        dk = dk.view(B, Hkv, Hq // Hkv, *dk.shape[2:]).sum(dim=2)
    return dq.to(query.dtype), dk.to(key.dtype)
