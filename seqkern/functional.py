"""The public functional API."""
import math

import torch

from seqkern import autocast, reference, transforms
from seqkern.ops import attention as _attention_ops
from seqkern.ops import rnn_cells as _cell_ops

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(name, t):
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def _check_attention_inputs(query, key, value, attn_mask, dropout_p, enable_gqa,
                            key_padding_mask):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_describe(name, t)}: expected a 4-D tensor [B, H, L, D] "
                             "(scaled_dot_product_attention: [..., L, D], 2-D up)")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{_describe(name, t)}: expected fp16, bf16, fp32 or fp64")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{_describe(name, t)} must have query's dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{_describe(name, t)} must be on query's device {query.device}")
    B, Hq, L, D = query.shape
    _, Hkv, S, _ = key.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"batch sizes differ: {_describe('query', query)}, "
                         f"{_describe('key', key)}, {_describe('value', value)}")
    if key.shape[-1] != D:
        raise ValueError(f"head dims differ: {_describe('query', query)} has D={D}, "
                         f"{_describe('key', key)} has D={key.shape[-1]}")
    if value.shape[1] != Hkv or value.shape[2] != S:
        raise ValueError(f"{_describe('value', value)} must match key's heads and length "
                         f"({Hkv}, {S})")
    if D == 0 or value.shape[-1] == 0:
        raise ValueError(f"head dims must be at least 1, got D={D}, Dv={value.shape[-1]}")
    if Hkv != Hq:
        if not enable_gqa:
            raise ValueError(f"query has {Hq} heads but key/value have {Hkv}; pass "
                             "enable_gqa=True for grouped-query attention")
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"enable_gqa needs query heads ({Hq}) to be a multiple of "
                             f"key/value heads ({Hkv})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(f"{_describe('attn_mask', attn_mask)}: expected bool or the "
                             f"query's dtype {query.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"{_describe('attn_mask', attn_mask)} must be on {query.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, Hq, L, S))
        except RuntimeError:
            raise ValueError(f"{_describe('attn_mask', attn_mask)} does not broadcast to "
                             f"[B, Hq, L, S] = {[B, Hq, L, S]}") from None
        if attn_mask.dim() > 4:
            raise ValueError(f"{_describe('attn_mask', attn_mask)}: at most 4 dims")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "seqkern attention does not compute a gradient for attn_mask; pass "
                "attn_mask.detach() (torch's SDPA math path would differentiate it)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError("key_padding_mask must be a tensor or None")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"{_describe('key_padding_mask', key_padding_mask)}: expected "
                             "bool (True marks padding)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"{_describe('key_padding_mask', key_padding_mask)}: expected "
                             f"shape [B, S] = {[B, S]}")
        if key_padding_mask.device != query.device:
            raise ValueError(f"{_describe('key_padding_mask', key_padding_mask)} must be on "
                             f"{query.device}")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *,
                                 key_padding_mask=None):
    """Fused masked attention, like torch.nn.functional.scaled_dot_product_attention.

    Args:
      query: [B, Hq, L, D]; key: [B, Hkv, S, D]; value: [B, Hkv, S, Dv]. Any strides. As
        torch's: 2-D [L, D], 3-D [H, L, D] or more leading dims than B, broadcasting between query,
        key and value (then viewed as one batch, copied where a broadcast must be).
        fp16, bf16, fp32 (every backend) or fp64 (cpu, reference). Any head dims on the
        CPU; on a GPU the Triton and CUDA kernels take up to 256, wider heads run the
        reference backend (right, not fast).
      attn_mask: bool (True = may attend) or float (added to the scores) in query's dtype
        or a narrower float one (converted, exactly; a wider one, e.g. float32 beside a
        bf16 query, is refused: rounded to bf16 a bias of 100 lost 50x torch's error),
        broadcastable to [B, Hq, L, S]. Read through its strides, never expanded.
      dropout_p: dropout on the attention probabilities (counter-based RNG seeded from
        torch's default CPU generator; regenerated in the backward).
      is_causal: key j visible to query i iff j <= i (top-left aligned when L != S).
        Unlike torch, may be combined with attn_mask and key_padding_mask.
      scale: score scale, default 1/sqrt(D).
      enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention).
      key_padding_mask: [B, S] bool, True marks padding keys to ignore.

    Returns:
      [B, Hq, L, Dv] in query's dtype. A query row with no visible key gives 0 (and zero
      gradients), never NaN.

    Example:
      >>> q = k = v = torch.randn(2, 8, 128, 64)
      >>> out = seqkern.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    if (isinstance(attn_mask, torch.Tensor) and isinstance(query, torch.Tensor) and
            attn_mask.is_floating_point() and attn_mask.dtype != query.dtype and
            torch.promote_types(attn_mask.dtype, query.dtype) == query.dtype):
        attn_mask = attn_mask.to(query.dtype)  # exact; a wider mask is refused below
    q, k, v, mask, kpm, lead = (_as_batch_of_heads(query, key, value, attn_mask,
                                                   key_padding_mask) or
                                (query, key, value, attn_mask, key_padding_mask, None))
    out, _ = attention_with_lse(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa,
                                key_padding_mask=kpm)
    if lead is None:
        return out
    out = out.reshape(*lead, *out.shape[1:])
    return out.squeeze(0) if max(query.dim(), key.dim(), value.dim()) == 2 else out


def _as_batch_of_heads(query, key, value, attn_mask, key_padding_mask):
    """Inputs torch's sdpa takes beyond [B, H, L, D] with equal batches (2-D [L, D], 3-D
    [H, L, D], more leading dims, leading dims that broadcast): (query, key, value, attn_mask,
    key_padding_mask) as [B, H, L, D] etc. over B = the leading dims' product, and the
    leading dims; None for plain 4-D input (or for what the 4-D checks should reject)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in tensors):
        return None
    heads = {t.shape[-3] if t.dim() > 2 else 1 for t in tensors}
    broadcast_heads = len(heads) > 1 and 1 in heads  # torch's matmul broadcasts a head of 1
    if all(t.dim() == 4 for t in tensors) and query.shape[0] == key.shape[0] == \
            value.shape[0] and not broadcast_heads:
        return None
    # 2-D [L, D] is one head of one batch (torch's matmul broadcasts it likewise).
    tensors = query, key, value = tuple(t.unsqueeze(0) if t.dim() == 2 else t for t in tensors)
    if broadcast_heads:
        H = max(heads)
        tensors = query, key, value = tuple(
            t.expand(*t.shape[:-3], H, *t.shape[-2:]) if t.shape[-3] == 1 else t
            for t in tensors)
    names = ("query", "key", "value")
    try:
        lead = torch.broadcast_shapes(*(t.shape[:-3] for t in tensors))
    except RuntimeError:
        described = ", ".join(_describe(n, t) for n, t in zip(names, tensors))
        raise ValueError(f"the leading dims of {described} do not broadcast") from None
    Hq, L, S = query.shape[-3], query.shape[-2], key.shape[-2]

    def batch_of(name, t, tail):
        if t is None:
            return None
        try:
            return t.expand(*lead, *tail).reshape(-1, *tail)
        except RuntimeError:
            raise ValueError(f"{_describe(name, t)} does not broadcast to "
                             f"{[*lead, *tail]}") from None

    return (*(batch_of(n, t, t.shape[-3:]) for n, t in zip(names, tensors)),
            batch_of("attn_mask", attn_mask, (Hq, L, S)),
            batch_of("key_padding_mask", key_padding_mask, (S,)), lead)


def attention_with_lse(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                       scale=None, enable_gqa=False, *, key_padding_mask=None,
                       seed_offset=None):
    """As scaled_dot_product_attention, but returns (out, lse [B, Hq, L] fp32).

    lse is the log-sum-exp of each row's masked, scaled scores (-inf for a row with no
    visible key); a float mask row whose largest entry is beyond +-256 is first shifted to
    a largest entry of 0 (softmax does not change; _rows_to_zero_max), so its lse is that
    of the shifted scores. exp(score - lse), with the same shift, gives the attention
    weights (attention_weights applies it). seed_offset (int64 [2],
    from seqkern.ops.attention.draw_dropout_seed) fixes the dropout pattern. Under autocast,
    as torch's (an autocast op): query, key, value and a float mask in the autocast dtype.
    """
    if isinstance(query, torch.Tensor):
        compute = autocast.function_dtype(query)
        if compute is not None:
            query, key, value = autocast.cast((query, key, value), compute)
            if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(compute)
    _check_attention_inputs(query, key, value, attn_mask, dropout_p, enable_gqa,
                            key_padding_mask)
    B, Hq, L, D = query.shape
    S = key.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if attn_mask is not None:
        attn_mask = _rows_to_zero_max(attn_mask).expand(B, Hq, L, S)  # stride-0 view
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed_offset is None:
        seed_offset = _attention_ops.draw_dropout_seed()
    if dropout_p == 0.0:
        seed_offset = None
    if transforms.active():  # torch.func / forward AD: plain torch ops
        return reference.attention(query, key, value, attn_mask, dropout_p, bool(is_causal),
                                   scale, key_padding_mask,
                                   reference.keep_mask_for(query, key, dropout_p,
                                                           seed_offset))
    return torch.ops.seqkern.attention_fwd(query, key, value, attn_mask, key_padding_mask,
                                           dropout_p, bool(is_causal), scale, seed_offset)


# A float mask row whose largest entry lies beyond this (in magnitude) is shifted to 0: its
# lse then rounds no more than a mask row near 0 does (ulp(256) in fp32 is 3e-5).
MASK_ROW_SHIFT_ABOVE = 256.0


def _rows_to_zero_max(attn_mask):
    """A float mask with each row (last dim) whose largest entry is finite and beyond
    MASK_ROW_SHIFT_ABOVE in magnitude shifted by it: the softmax, the output and every
    gradient are unchanged in exact arithmetic, and a row masked entirely by a large finite
    value (-1e9, finfo.min) keeps its scores. Other rows, every ordinary mask, are as given.

    Without it such a row's lse = m + log(sum) rounded to its max m (log S is below the
    ulp of 1e9 in fp32, of 1e30 in fp64), and every recomputation exp(s - lse) (the
    backward, attention_weights) gave each key weight 1 instead of ~1/S: dv S times too
    large, MultiheadAttention's weights summing to S, silently. (torch's fused CPU sdpa
    backward does the same; its math path rounds the row's scores to one value: uniform
    weights.) The cost, over the mask as given (not its broadcast): a max per row, and on a
    GPU (where knowing that no row needs it would sync) or under torch.compile a shifted
    copy; on the CPU the copy only where a row needs it."""
    if not attn_mask.is_floating_point():
        return attn_mask
    top = attn_mask.amax(dim=-1, keepdim=True) if attn_mask.dim() else attn_mask
    big = top.abs() > MASK_ROW_SHIFT_ABOVE
    if attn_mask.device.type == "cpu" and not torch.compiler.is_compiling() and \
            not bool(big.any()):
        return attn_mask  # the common case on the CPU: no copy (a GPU would sync to know)
    return attn_mask - torch.where(big & torch.isfinite(top), top, 0.0)


def attention_weights(query, key, lse, attn_mask=None, dropout_p=0.0, is_causal=False,
                      scale=None, *, key_padding_mask=None, seed_offset=None,
                      average_heads=True):
    """The attention probabilities of attention_with_lse, rebuilt from its lse in one pass.

    Args:
      query [B, Hq, L, D], key [B, Hkv, S, D]: as given to attention_with_lse.
      lse: its [B, Hq, L] log-sum-exp. attn_mask, dropout_p, is_causal, scale,
        key_padding_mask, seed_offset: the same as the forward's, so the weights returned
        are exactly those that multiplied value (after dropout, when dropout_p > 0).
      average_heads: the mean over heads [B, L, S] (else [B, Hq, L, S]).

    Returns:
      weights in query's dtype; 0 on rows with no visible key. Differentiable (through
      seqkern.reference, which materialises [B, Hq, L, S]: slow, and rarely wanted).

    Example:
      >>> out, lse = seqkern.functional.attention_with_lse(q, k, v, key_padding_mask=kpm)
      >>> w = seqkern.functional.attention_weights(q, k, lse, key_padding_mask=kpm)
    """
    _check_attention_inputs(query, key, key, attn_mask, dropout_p, True, key_padding_mask)
    B, Hq, L, D = query.shape
    S = key.shape[2]
    if tuple(lse.shape) != (B, Hq, L):
        raise ValueError(f"{_describe('lse', lse)}: expected the forward's [B, Hq, L] = "
                         f"{[B, Hq, L]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if attn_mask is not None:  # shifted as attention_with_lse's, whose lse this is
        attn_mask = _rows_to_zero_max(attn_mask).expand(B, Hq, L, S)
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed_offset is None:
        raise ValueError("dropout_p > 0 needs the forward's seed_offset, or the weights "
                         "would not be the ones it used")
    if dropout_p == 0.0:
        seed_offset = None
    if transforms.active():  # torch.func / forward AD: plain torch ops
        return reference.attention_weights(query, key, lse, attn_mask, bool(is_causal), scale,
                                           key_padding_mask,
                                           reference.keep_mask_for(query, key, dropout_p,
                                                                   seed_offset),
                                           dropout_p, bool(average_heads))
    return torch.ops.seqkern.attention_weights(query, key, lse, attn_mask, key_padding_mask,
                                               bool(is_causal), scale, dropout_p,
                                               seed_offset, bool(average_heads))


# ----------------------------------------------------------------------- recurrent cells

def _check_cell_tensor(fn, name, t, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"seqkern {fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"seqkern {fn}: {_describe(name, t)}: expected fp16, bf16, fp32 "
                           "or fp64")
    if dtype is not None and t.dtype != dtype:
        raise RuntimeError(f"seqkern {fn}: {_describe(name, t)} must have the input's dtype "
                           f"{dtype}")
    if device is not None and t.device != device:
        raise RuntimeError(f"seqkern {fn}: {_describe(name, t)} must be on the input's "
                           f"device {device}")


def _cell(fn, mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """Validates like torch's _VF cells (same exception types and messages where torch
    has one), handles 1-D input and missing states, then runs seqkern::rnn_cell_fwd."""
    _check_cell_tensor(fn, "input", input)
    if input.dim() not in (1, 2):
        raise ValueError(f"{fn}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    dtype, device = input.dtype, input.device
    for name, t in (("w_ih", w_ih), ("w_hh", w_hh)):
        _check_cell_tensor(fn, name, t, dtype, device)
        if t.dim() != 2:
            raise RuntimeError(f"seqkern {fn}: {_describe(name, t)}: expected a 2-D weight")
    gates = _cell_ops.GATES[mode]
    H = w_hh.shape[1]
    if w_hh.shape[0] != gates * H or w_ih.shape[0] != gates * H:
        raise RuntimeError(f"seqkern {fn}: expected w_ih [{gates}*H, I] and w_hh "
                           f"[{gates}*H, H], got {_describe('w_ih', w_ih)}, "
                           f"{_describe('w_hh', w_hh)}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"seqkern {fn}: b_ih and b_hh must both be given or both be None")
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh)):
        if t is not None:
            _check_cell_tensor(fn, name, t, dtype, device)
            if tuple(t.shape) != (gates * H,):
                raise RuntimeError(f"seqkern {fn}: {_describe(name, t)}: expected shape "
                                   f"[{gates * H}]")
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    states = []
    for idx, s in enumerate((hx, cx) if mode == "LSTM" else (hx,)):
        if s is None:
            s = torch.zeros(x.shape[0], H, dtype=dtype, device=device)
        else:
            _check_cell_tensor(fn, f"hidden{idx}", s, dtype, device)
            s = s if batched else s.unsqueeze(0)
        states.append(s)
    if x.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected "
                           f"{w_ih.shape[1]}")
    for idx, s in enumerate(states):
        if s.dim() < 2 or s.shape[0] != x.shape[0]:
            raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{idx} "
                               f"batch size {s.shape[0] if s.dim() else 0}")
        if s.shape[1] != H:
            raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {s.shape[1]}, "
                               f"expected {H}")
        if s.dim() != 2:
            raise RuntimeError(f"seqkern {fn}: hidden{idx} of shape {tuple(s.shape)} must be "
                               f"{'2-D' if batched else '1-D'} like the input")
    if transforms.active():  # torch.func / forward AD: plain torch ops
        h, *c = _cell_ops.reference_step(mode, x, states[0],
                                         states[1] if mode == "LSTM" else None,
                                         w_ih, w_hh, b_ih, b_hh)
        c = c[0] if c else h
    else:
        h, c, _ = torch.ops.seqkern.rnn_cell_fwd(mode, x, states[0],
                                                 states[1] if mode == "LSTM" else None,
                                                 w_ih, w_hh, b_ih, b_hh)
    if not batched:
        h, c = h.squeeze(0), c.squeeze(0)
    return (h, c) if mode == "LSTM" else h


def lstm_cell(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One fused LSTM step, like torch's LSTMCell (gate order i, f, g, o).

    Args:
      input: [B, I] or unbatched [I]. fp16, bf16, fp32 (every backend) or fp64 (cpu,
        reference); any strides.
      hx, cx: [B, H] ([H] unbatched) or None for zeros.
      w_ih: [4H, I]; w_hh: [4H, H]; b_ih, b_hh: [4H], both or neither.

    Returns:
      (h' [B, H], c' [B, H]), differentiable in every input (double backward through the
      reference cell).

    Example:
      >>> x, h, c = torch.randn(16, 64), torch.zeros(16, 128), torch.zeros(16, 128)
      >>> w_ih, w_hh = torch.randn(512, 64), torch.randn(512, 128)
      >>> h, c = seqkern.functional.lstm_cell(x, h, c, w_ih, w_hh)
    """
    return _cell("LSTMCell", "LSTM", input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One fused GRU step, like torch's GRUCell (gates r, z, n; b_hn inside r * (...)).

    Args:
      input: [B, I] or [I]; hx: [B, H] or [H] or None for zeros.
      w_ih: [3H, I]; w_hh: [3H, H]; b_ih, b_hh: [3H], both or neither.

    Returns:
      h' [B, H] ([H] unbatched).

    Example:
      >>> h = seqkern.functional.gru_cell(torch.randn(8, 32), None, torch.randn(96, 32),
      ...                                 torch.randn(96, 32))
    """
    return _cell("GRUCell", "GRU", input, hx, None, w_ih, w_hh, b_ih, b_hh)


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One fused Elman RNN step: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh).

    Args:
      input: [B, I] or [I]; hx: [B, H] or [H] or None for zeros.
      w_ih: [H, I]; w_hh: [H, H]; b_ih, b_hh: [H], both or neither.
      nonlinearity: "tanh" or "relu" (anything else raises RuntimeError, as torch's
        RNNCell does at forward time).

    Returns:
      h' [B, H] ([H] unbatched).

    Example:
      >>> h = seqkern.functional.rnn_cell(torch.randn(8, 32), None, torch.randn(64, 32),
      ...                                 torch.randn(64, 64), nonlinearity="relu")
    """
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
    return _cell("RNNCell", mode, input, hx, None, w_ih, w_hh, b_ih, b_hh)
