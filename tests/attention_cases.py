"""Input builders shared by the attention tests."""
import os

import pytest
import torch

import seqkern
from seqkern import reference
from seqkern.backends import BACKENDS
from seqkern.ops.attention import draw_dropout_seed


# Where the tests' tensors live: "cpu" here; "cuda" in bench/gpu_check.sh (tests/conftest.py).
DEVICE = os.environ.get("SEQKERN_TEST_DEVICE", "cpu")


def skip_unless_usable(backend):
    """Skips the calling test when `backend` cannot run on DEVICE here (with its reasons)."""
    reasons = BACKENDS[backend].availability(DEVICE)
    if reasons:
        pytest.skip(f"{backend} backend not usable here: {'; '.join(reasons)}")


def make_qkv(B, Hq, Hkv, L, S, D, Dv=None, dtype=torch.float32, layout="contiguous"):
    """q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] with the requested strides.

    layout "contiguous": plain [B, H, L, D]; "packed": views of [B, L, H, D] projections
    (as MultiheadAttention hands them in); "strided": every dim strided (sliced last dim).
    """
    Dv = D if Dv is None else Dv

    def one(H, T, E):
        if layout == "contiguous":
            return torch.randn(B, H, T, E, dtype=torch.float64)
        if layout == "packed":
            return torch.randn(B, T, H, E, dtype=torch.float64).transpose(1, 2)
        if layout == "strided":
            return torch.randn(B, H, T, 2 * E, dtype=torch.float64)[..., ::2]
        raise ValueError(layout)

    q, k, v = one(Hq, L, D), one(Hkv, S, D), one(Hkv, S, Dv)
    return tuple(t.to(dtype) for t in (q, k, v))


def make_masks(kind, B, Hq, L, S, dtype):
    """(attn_mask, key_padding_mask, is_causal) for a mask kind such as 'causal+pad'."""
    attn_mask, kpm, causal = None, None, False
    for part in kind.split("+"):
        if part == "none":
            continue
        elif part == "causal":
            causal = True
        elif part == "pad":
            lengths = torch.randint(0, S + 1, (B,))
            lengths[0] = S  # at least one unpadded row; others may be fully padded
            kpm = torch.arange(S)[None, :] >= lengths[:, None]
        elif part == "holes":  # left padding and gaps: batch 0's first real key is late
            kpm = torch.rand(B, S) < 0.3
            kpm[0, : S // 2] = True
            kpm[0, -1] = False
        elif part == "bool":  # [L, S] broadcast over batch and heads
            attn_mask = torch.rand(L, S) > 0.3
        elif part == "bool4":  # per batch and head
            attn_mask = torch.rand(B, Hq, L, S) > 0.3
        elif part == "float":  # [B, 1, L, S] broadcast over heads
            attn_mask = (torch.randn(B, 1, L, S) * 2).to(dtype)
        elif part == "floatinf":  # float mask with -inf entries (fully masked rows too)
            m = torch.randn(1, Hq, L, S) * 2
            m[torch.rand(1, Hq, L, S) < 0.4] = float("-inf")
            if L > 1:
                m[:, :, L // 2, :] = float("-inf")
            attn_mask = m.to(dtype)
        else:
            raise ValueError(part)
    return attn_mask, kpm, causal


def opcheck_inputs():
    """Arguments of seqkern::attention_fwd exercising GQA, both masks, causal and dropout."""
    q, k, v = make_qkv(2, 2, 1, 7, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 5:] = True
    mask = torch.randn(1, 1, 7, 9).expand(2, 2, 7, 9)
    seed = torch.tensor([1234, 0], dtype=torch.int64)
    return (q, k, v, mask, kpm, 0.2, True, 0.25, seed)


def run(backend, q, k, v, attn_mask, kpm, causal, dropout_p=0.0, scale=None, gqa=False,
        seed_offset=None):
    with seqkern.backend(backend):
        return seqkern.functional.attention_with_lse(
            q, k, v, attn_mask, dropout_p, causal, scale, gqa, key_padding_mask=kpm,
            seed_offset=seed_offset)


def reference64(q, k, v, attn_mask, kpm, causal, dropout_p=0.0, scale=None,
                seed_offset=None):
    keep = None
    if dropout_p > 0:
        B, H, L, _ = q.shape
        keep = reference.dropout_keep_mask(seed_offset, B, H, L, k.shape[2], dropout_p)
    m = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() \
        else attn_mask
    return reference.attention(q.double(), k.double(), v.double(), m, dropout_p, causal,
                               scale, kpm, keep)


def fresh_seed():
    return draw_dropout_seed()
