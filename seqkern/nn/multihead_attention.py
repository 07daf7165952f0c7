"""seqkern.nn.MultiheadAttention: torch.nn.MultiheadAttention on seqkern's fused attention.

A subclass of torch's module: the constructor, parameters, their registration order and
initialisation, state_dict keys, merge_masks and __setstate__ are torch's own, so weights
load both ways and isinstance checks (nn.TransformerEncoderLayer's) pass. forward is
rewritten: it never calls torch's implementation. q, k and v are strided views of the
projections; masks reach the kernel as they are (a [L, S] mask as a stride-0 broadcast, a
bool key padding mask as a [B, S] vector), never expanded to [B, H, L, S].
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from seqkern import functional as _functional
from seqkern.nn.torchscript import NotScriptable
from seqkern.ops.attention import draw_dropout_seed


def _check_mask_dtype(mask, name):
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported "
                             f"(got {mask.dtype}; uint8 byte masks are no longer accepted)")


def _disable_layer_fast_path(module, args):
    # A no-op forward pre-hook: nn.TransformerEncoderLayer skips its fused inference path
    # (torch's own kernels, reading this module's weights) when a submodule has hooks, so
    # that this module's forward, and seqkern's kernels, always run.
    return None


class MultiheadAttention(NotScriptable, nn.MultiheadAttention):
    """Drop-in torch.nn.MultiheadAttention running on seqkern's fused attention kernels.

    Same constructor, attributes, parameters, state_dict, forward signature, return values
    and errors as torch.nn.MultiheadAttention (see its documentation):

      MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                         add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
                         device=None, dtype=None)
      forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
              average_attn_weights=True, is_causal=False) -> (out, weights or None)

    Shapes: query [L, N, E] ([N, L, E] if batch_first, [L, E] unbatched), key [S, N, kdim],
    value [S, N, vdim]; key_padding_mask [N, S] (True or -inf = ignore the key); attn_mask
    [L, S] or [N * num_heads, L, S] (index n * num_heads + h), bool (True = NOT allowed, the
    opposite of scaled_dot_product_attention) or float (added to the scores).

    Deliberate differences from torch:
      * A query row whose keys are all masked gives zeros (output = out_proj.bias, weights
        0, finite gradients), never NaN; torch gives NaN with need_weights=True.
      * Gradients through the returned attention weights are right but slow: they run
        seqkern's pure-PyTorch reference, materialising [N, H, L, S].
      * A float key_padding_mask together with an attn_mask is merged into one float mask
        [N, 1 or num_heads, L, S] (a bool key_padding_mask never is).
      * Dropout draws from seqkern's counter-based generator (seeded from torch's), so the
        dropped entries differ from torch's for the same seed.
      * NestedTensor inputs (self-attention, batch_first, no masks, as torch's inference
        fast path takes them) run padded; returned weights, if asked for, are padded.
      * Inside nn.TransformerEncoderLayer the layer's fused inference path is turned off (by
        a no-op forward pre-hook) so that this module's kernels run.

    Example:
      >>> mha = seqkern.nn.MultiheadAttention(512, 8, batch_first=True)
      >>> mha.load_state_dict(torch_mha.state_dict())
      >>> out, weights = mha(x, x, x, key_padding_mask=padding)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_forward_pre_hook(_disable_layer_fast_path)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights,
                                        attn_mask, average_attn_weights)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is "
                          "deprecated. Use same type for both instead.", stacklevel=2)
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                        self.num_heads)
        self_attention = query is key and key is value
        shared_kv = key is value
        batch_first = self.batch_first and is_batched
        if not is_batched:  # [L, E] -> [L, 1, E]; masks get their batch dim below
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_dim, batch_dim = (1, 0) if batch_first else (0, 1)
        L, N = query.shape[seq_dim], query.shape[batch_dim]
        S = key.shape[seq_dim]

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask.")
        # torch's rule: the hint replaces the mask only without a key padding mask and when
        # no weights are returned; otherwise the explicit mask is used as it is.
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        self._check_inputs(query, key, value, N, S, seq_dim, batch_dim)
        if attn_mask is not None:
            self._check_attn_mask(attn_mask, N, L, S)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise AssertionError(f"expecting key_padding_mask shape of {(N, S)}, but got "
                                 f"{tuple(key_padding_mask.shape)}")

        q, k, v = self._project(query, key, value, self_attention, shared_kv, batch_first)
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if extra:
            k, v = self._append_keys(k, v, N)
        attn_mask, key_padding_mask = _kernel_masks(attn_mask, key_padding_mask, N,
                                                    self.num_heads, L, extra, q.dtype)

        dropout_p = self.dropout if self.training else 0.0
        seed_offset = draw_dropout_seed() if dropout_p > 0.0 else None
        scale = 1.0 / math.sqrt(self.head_dim)
        out, lse = _functional.attention_with_lse(
            q, k, v, attn_mask, dropout_p, causal, scale, key_padding_mask=key_padding_mask,
            seed_offset=seed_offset)
        weights = None
        if need_weights:
            weights = _functional.attention_weights(
                q, k, lse, attn_mask, dropout_p, causal, scale,
                key_padding_mask=key_padding_mask, seed_offset=seed_offset,
                average_heads=average_attn_weights)
            if not is_batched:
                weights = weights.squeeze(0)

        # [N, H, L, Dh] -> [L, N, E] or [N, L, E], then the output projection.
        out = out.permute((0, 2, 1, 3) if batch_first else (2, 0, 1, 3))
        out = out.reshape(out.shape[0], out.shape[1], self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(1)
        return out, weights

    # ------------------------------------------------------------------------- pieces

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights):
        """NestedTensor self-attention, where torch's inference fast path takes it (as
        nn.TransformerEncoder hands it in): run padded with a key padding mask, return a
        NestedTensor. Weights (need_weights=True) come back padded, [N, (H,) L, L]."""
        if not (query is key and key is value and self.batch_first
                and key_padding_mask is None and attn_mask is None):
            raise AssertionError(
                "MultiheadAttention takes NestedTensor inputs only for self-attention "
                "(query is key is value) with batch_first=True and no masks, as torch's "
                "fast path does; pass padded tensors and a key_padding_mask instead")
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
        padded = query.to_padded_tensor(0.0)
        padding = torch.arange(padded.shape[1], device=query.device)[None, :] >= lengths[:, None]
        out, weights = self.forward(padded, padded, padded, key_padding_mask=padding,
                                    need_weights=need_weights,
                                    average_attn_weights=average_attn_weights)
        return torch._nested_tensor_from_mask(out, ~padding, mask_check=False), weights

    def _check_inputs(self, query, key, value, N, S, seq_dim, batch_dim):
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, "
                                 f"but got {query.shape[-1]}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {tuple(key.shape)} does not match value "
                                     f"shape {tuple(value.shape)}")
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:2])} "
                                     f"do not match value's {tuple(value.shape[:2])}")
            for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
                if t.shape[-1] != dim:
                    raise AssertionError(f"expecting {name} of embedding dimension {dim} "
                                         f"(the module's {name[0]}dim), but got "
                                         f"{t.shape[-1]}")
        if key.shape[batch_dim] != N:
            raise RuntimeError(f"query has batch size {N} but key and value have "
                               f"{key.shape[batch_dim]}")

    def _check_attn_mask(self, attn_mask, N, L, S):
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (L, S):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                               f"should be {(L, S)}.")
        if attn_mask.dim() == 3 and tuple(attn_mask.shape) != (N * self.num_heads, L, S):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                               f"should be {(N * self.num_heads, L, S)}.")

    def _project(self, query, key, value, self_attention, shared_kv, batch_first):
        """q, k, v as [N, H, T, Dh] strided views of the input projections."""
        E = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(E)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attention:  # one GEMM for q, k and v
                q, k, v = F.linear(query, w, bias).split(E, dim=-1)
            elif shared_kv:  # encoder-decoder: one GEMM for q, one for k and v
                q = F.linear(query, w[:E], b_q)
                k, v = F.linear(key, w[E:], None if bias is None else bias[E:]).split(E, -1)
            else:
                w_q, w_k, w_v = w.split(E)
                q, k, v = (F.linear(query, w_q, b_q), F.linear(key, w_k, b_k),
                           F.linear(value, w_v, b_v))
        else:
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        order = (0, 2, 1, 3) if batch_first else (1, 2, 0, 3)
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).permute(order)
                     for t in (q, k, v))

    def _append_keys(self, k, v, N):
        """k, v [N, H, S, Dh] with bias_k/bias_v and/or a zero key appended (S + extra)."""
        H, Dh = self.num_heads, self.head_dim
        k_extra, v_extra = [], []
        if self.bias_k is not None:
            k_extra.append(self.bias_k.to(k.dtype).view(1, H, 1, Dh).expand(N, H, 1, Dh))
            v_extra.append(self.bias_v.to(v.dtype).view(1, H, 1, Dh).expand(N, H, 1, Dh))
        if self.add_zero_attn:
            k_extra.append(k.new_zeros(N, H, 1, Dh))
            v_extra.append(v.new_zeros(N, H, 1, Dh))
        return torch.cat([k, *k_extra], dim=2), torch.cat([v, *v_extra], dim=2)


def _kernel_masks(attn_mask, key_padding_mask, N, H, L, extra, dtype):
    """torch's masks in the attention op's form: (attn_mask [.., L, S'] or None,
    key_padding_mask [N, S'] bool or None), S' = S + extra always-visible keys.

    Bool masks flip to the op's convention (True = may attend); float masks are cast to
    the compute dtype. A float key_padding_mask becomes a [N, 1, 1, S'] float mask,
    merged (added) into attn_mask when there is one.
    """
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # [N * H, L, S], index n * H + h
            attn_mask = attn_mask.view(-1, H, L, attn_mask.shape[-1])
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
        else:
            attn_mask = attn_mask.to(dtype)
        if extra:
            attn_mask = F.pad(attn_mask, (0, extra), value=attn_mask.dtype == torch.bool)
    if key_padding_mask is not None:
        if extra:
            key_padding_mask = F.pad(key_padding_mask, (0, extra), value=0)
        if key_padding_mask.is_floating_point():
            padding = key_padding_mask.to(dtype).view(N, 1, 1, -1)
            if attn_mask is None:
                attn_mask = padding
            else:
                if attn_mask.dtype == torch.bool:
                    attn_mask = torch.zeros(attn_mask.shape, dtype=dtype,
                                            device=attn_mask.device).masked_fill_(
                                                ~attn_mask, float("-inf"))
                attn_mask = attn_mask + padding
            key_padding_mask = None
    return attn_mask, key_padding_mask


def swap_modules(model):
    """Replaces every torch.nn.MultiheadAttention in `model` with seqkern's, in place.

    Each module keeps its parameters (the same Parameter objects, so an optimizer built
    before still updates them), device, dtype, training mode and hooks: only its class
    changes. Subclasses of nn.MultiheadAttention other than seqkern's are left alone (they
    may override forward). Returns model.

    Example:
      >>> model = seqkern.swap_modules(nn.Transformer(512, 8))
    """
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.register_forward_pre_hook(_disable_layer_fast_path)
    return model
