"""seqkern::attention_fwd / attention_bwd / attention_weights: schemas, fakes and autograd.

The op bodies ask the dispatcher (seqkern.backends) for a backend and run it. Shapes:
query [B, Hq, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv]; attn_mask already
broadcast (as a stride-0 view) to [B, Hq, L, S] or None; key_padding_mask [B, S] bool
or None; seed_offset int64 [2] on the CPU (dropout's counter-based RNG) or None.
Outputs: out [B, Hq, L, Dv] (query's dtype), lse [B, Hq, L] (fp32; fp64 for fp64 inputs).
out and the gradients dq, dk, dv are laid out "heads inner", as dense [B, T, H, D] tensors
transposed to [B, H, T, D], by every backend: the layout of a projection split into heads, so that
MultiheadAttention merges the heads of out, and autograd those of dq, dk, dv, without
copies.
attention_weights turns the forward's lse back into the probabilities ([B, Hq, L, S], or
[B, L, S] averaged over heads) in one more pass over q.k. Its backward (rarely wanted:
torch's layers never backpropagate through the weights) runs seqkern.reference on every
backend, materialising [B, Hq, L, S].
"""
from typing import Optional

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.autocast import kernel_dtypes_as_given
from seqkern.ops.outputs import strided_like_transposed, unviewed
from seqkern.ops.registration import seqkern_op


def _inputs(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal):
    return dict(device=query.device, dtype=query.dtype, query=query, key=key, value=value,
                attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                dropout_p=dropout_p, is_causal=is_causal)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_attention_args(query, key, value, attn_mask, key_padding_mask, dropout_p,
                         seed_offset):
    """The op's arguments, checked before a kernel reads them, as csrc/attention_args.h does
    for the cpu and cuda entry points (CHECKS_ARGS): the Triton kernels index by these shapes
    without bounds checks (a key of another head dim or batch, a value of another length
    gave wrong answers, silently, when the op was called directly)."""
    def fail(message):
        raise RuntimeError(f"seqkern attention: {message}")

    q, k, v = query, key, value
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        fail("query, key, value must be 4-D [B, H, L, D]")
    if k.device != q.device or v.device != q.device:
        fail("query, key, value must be on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail("query, key, value must share a dtype")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        fail("batch sizes differ")
    if k.shape[3] != q.shape[3]:
        fail("query and key head dims differ")
    if v.shape[1:3] != k.shape[1:3]:
        fail("value must match key's heads and length")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        fail("query heads must be a multiple of key/value heads")
    if attn_mask is not None:
        if tuple(attn_mask.shape) != (*q.shape[:3], k.shape[2]):
            fail("attn_mask must be broadcast to [B, Hq, L, S]")
        if attn_mask.dtype not in (torch.bool, q.dtype):
            fail("attn_mask must be bool or the query's dtype")
        if attn_mask.device != q.device:
            fail("attn_mask must be on the query's device")
    if key_padding_mask is not None:
        if (tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]) or
                key_padding_mask.dtype != torch.bool):
            fail("key_padding_mask must be a [B, S] bool tensor")
        if key_padding_mask.device != q.device:
            fail("key_padding_mask must be on the query's device")
    if dropout_p > 0 and (seed_offset is None or seed_offset.numel() != 2 or
                          seed_offset.dtype != torch.int64 or
                          seed_offset.device.type != "cpu"):
        fail("dropout needs seed_offset: a CPU int64 tensor [seed, offset]")


def check_lse(query, lse):
    if (lse.dtype != _lse_dtype(query.dtype) or tuple(lse.shape) != tuple(query.shape[:3])
            or lse.device != query.device):
        raise RuntimeError("seqkern attention: lse must be the forward's [B, Hq, L] "
                           "log-sum-exp")


def check_attention_grads(query, value, grad_out, out, lse):
    """attention_bwd's grad_out and out [B, Hq, L, Dv] and lse (csrc/attention_args.h)."""
    if (out.dim() != 4 or grad_out.shape != out.shape or
            tuple(out.shape) != (*query.shape[:3], value.shape[3])):
        raise RuntimeError("seqkern attention: grad_out and out must be [B, Hq, L, Dv]")
    if grad_out.dtype != query.dtype or out.dtype != query.dtype:
        raise RuntimeError("seqkern attention: grad_out and out must have the query's dtype")
    if grad_out.device != query.device or out.device != query.device:
        raise RuntimeError("seqkern attention: grad_out, out and lse must be on the query's "
                           "device")
    check_lse(query, lse)


@seqkern_op("attention_fwd")
@kernel_dtypes_as_given
def attention_fwd(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                  scale: float, seed_offset: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    impl = backends.select("attention", _inputs(query, key, value, attn_mask,
                                                key_padding_mask, dropout_p, is_causal))
    if not backends.checks_own_args(impl):
        check_attention_args(query, key, value, attn_mask, key_padding_mask, dropout_p,
                             seed_offset)
    out, lse = impl.attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p,
                                  is_causal, scale, seed_offset)
    return unviewed(out), unviewed(lse)


@attention_fwd.register_fake
def _attention_fwd_fake(query, key, value, attn_mask, key_padding_mask, dropout_p,
                        is_causal, scale, seed_offset):
    B, H, L, _ = query.shape
    out = strided_like_transposed(query, (B, H, L, value.shape[-1]))
    lse = query.new_empty((B, H, L), dtype=_lse_dtype(query.dtype))
    return out, lse


@seqkern_op("attention_bwd")
@kernel_dtypes_as_given
def attention_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                  lse: Tensor, attn_mask: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                  scale: float, seed_offset: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.select("attention", _inputs(query, key, value, attn_mask,
                                                key_padding_mask, dropout_p, is_causal))
    if not backends.checks_own_args(impl):
        check_attention_args(query, key, value, attn_mask, key_padding_mask, dropout_p,
                             seed_offset)
        check_attention_grads(query, value, grad_out, out, lse)
    grads = impl.attention_bwd(grad_out, query, key, value, out, lse, attn_mask,
                               key_padding_mask, dropout_p, is_causal, scale, seed_offset)
    return tuple(unviewed(g) for g in grads)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                        dropout_p, is_causal, scale, seed_offset):
    # The layout every backend returns (empty_like would copy the strides of a packed
    # projection view, and compiled graphs would then view the real result wrongly).
    return tuple(strided_like_transposed(t, t.shape)
                 for t in (query, key, value))


def _setup_context(ctx, inputs, output):
    (query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
     seed_offset) = inputs
    out, lse = output
    # The backward ignores gradients of lse, so lse must not claim to have any.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, key_padding_mask,
                          seed_offset)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    backends.remember_forced(ctx)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, attn_mask, key_padding_mask, seed_offset = ctx.saved_tensors
    with backends.as_in_forward(ctx):
        dq, dk, dv = attention_bwd(grad_out, query, key, value, out, lse, attn_mask,
                                   key_padding_mask, ctx.dropout_p, ctx.is_causal, ctx.scale,
                                   seed_offset)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@seqkern_op("attention_weights")
@kernel_dtypes_as_given
def attention_weights(query: Tensor, key: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], is_causal: bool, scale: float,
                      dropout_p: float, seed_offset: Optional[Tensor],
                      average_heads: bool) -> Tensor:
    impl = backends.select("attention_weights", _inputs(query, key, key, attn_mask,
                                                        key_padding_mask, dropout_p,
                                                        is_causal))
    if not backends.checks_own_args(impl):
        check_attention_args(query, key, key, attn_mask, key_padding_mask, dropout_p,
                             seed_offset)
        check_lse(query, lse)
    return unviewed(impl.attention_weights(query, key, lse, attn_mask, key_padding_mask,
                                           is_causal, scale, dropout_p, seed_offset,
                                           average_heads))


@attention_weights.register_fake
def _attention_weights_fake(query, key, lse, attn_mask, key_padding_mask, is_causal, scale,
                            dropout_p, seed_offset, average_heads):
    B, H, L, _ = query.shape
    shape = (B, L, key.shape[2]) if average_heads else (B, H, L, key.shape[2])
    return query.new_empty(shape)


def _weights_setup_context(ctx, inputs, output):
    (query, key, lse, attn_mask, key_padding_mask, is_causal, scale, dropout_p, seed_offset,
     average_heads) = inputs
    ctx.save_for_backward(query, key, attn_mask, key_padding_mask, seed_offset)
    ctx.args = (is_causal, scale, dropout_p, average_heads)


@kernel_dtypes_as_given
def _weights_backward(ctx, grad_weights):
    query, key, attn_mask, key_padding_mask, seed_offset = ctx.saved_tensors
    is_causal, scale, dropout_p, average_heads = ctx.args
    keep = reference.keep_mask_for(query, key, dropout_p, seed_offset)
    # Plain torch ops (traceable by torch.compile). lse is the forward's, itself a function
    # of q and k: the reference differentiates the softmax whole, so lse gets no gradient.
    dq, dk = reference.attention_weights_backward(
        grad_weights, query, key, attn_mask, is_causal, scale, key_padding_mask, keep,
        dropout_p, average_heads)
    return dq, dk, None, None, None, None, None, None, None, None


attention_weights.register_autograd(_weights_backward, setup_context=_weights_setup_context)


def draw_dropout_seed(generator=None):
    """A fresh (seed, offset) pair for dropout, drawn from torch's CPU generator.

    Seeding torch (torch.manual_seed) makes it reproducible; tests redraw it to rebuild the
    realised keep-mask with seqkern.reference.dropout_keep_mask.
    """
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, generator=generator, device="cpu")
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device="cpu")])
